"""Request ids and structured logs.

* Every request carries an id: the client's ``X-Request-ID`` when it is sane (1-128 characters of
  ``A-Z a-z 0-9 . _ : + / = -``), else a new one (32 hex digits). It is echoed in the
  ``X-Request-ID`` response header and in JSON error bodies, and it is in every log line written
  while the request is handled.
* One access line per request, written by gunicorn's access log through :class:`GunicornLogger`:

      {"time": "2026-12-01T11:40:02.513+00:00", "level": "info", "logger": "gunicorn.access",
       "message": "POST /v1/captions 200", "request_id": "3f2a...", "method": "POST",
       "path": "/v1/captions", "status": 200, "duration_ms": 412.8, "model": "flickr8k-lite2",
       "model_version": "2.0", "batch_size": 3, "remote_addr": "10.0.0.7", "bytes": 5120}

  ``model``/``model_version``/``batch_size`` are what the app left in the WSGI environ
  (:func:`annotate`); null when the request did not reach the model.
* ``CAPTIONER_LOG_FORMAT`` (service/config.py): ``json`` (default, one JSON object per line for
  log collectors) or ``text`` (gunicorn's plain lines, the request id appended to access lines).
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from gunicorn.glogging import Logger

if TYPE_CHECKING:
    from gunicorn.config import Config
    from gunicorn.http.message import Request
    from gunicorn.http.wsgi import Response

HEADER = "X-Request-ID"
LOG_FORMATS = ("json", "text")
#: WSGI environ keys: the request id, and the fields the app adds to the access line.
ENVIRON_ID = "captioner.request_id"
ENVIRON_FIELDS = "captioner.log_fields"
_SANE_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
#: The access line's fields, in order (the app's annotations fill model, model_version, batch_size).
ACCESS_FIELDS = (
    "request_id",
    "method",
    "path",
    "status",
    "duration_ms",
    "model",
    "model_version",
    "batch_size",
    "remote_addr",
    "bytes",
)


def parse_log_format(raw: str) -> str:
    """``json`` or ``text`` (any case, surrounding blanks ignored); ValueError otherwise."""
    word = raw.strip().lower()
    if word not in LOG_FORMATS:
        raise ValueError(f"CAPTIONER_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, got {raw!r}")
    return word


def request_id(environ: MutableMapping[str, Any]) -> str:
    """The request's id, assigned on first use: a sane ``X-Request-ID`` header, else a new uuid4 hex."""
    rid = environ.get(ENVIRON_ID)
    if rid is None:
        given = environ.get("HTTP_X_REQUEST_ID", "")
        rid = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        environ[ENVIRON_ID] = rid
    return rid


def annotate(environ: MutableMapping[str, Any], **fields: Any) -> None:
    """Add ``fields`` (model, model_version, batch_size) to this request's access line."""
    environ.setdefault(ENVIRON_FIELDS, {}).update(fields)


def current_request_id() -> str | None:
    """The id of the Flask request being handled in this thread, if any."""
    try:
        from flask import has_request_context, request
    except ImportError:  # pragma: no cover - flask is part of the [service] extra
        return None
    return request_id(request.environ) if has_request_context() else None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, request_id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        else:
            rid = current_request_id()
            if rid is not None:
                out["request_id"] = rid
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def access_fields(
    status: int, environ: MutableMapping[str, Any], duration_s: float, sent: int | None
) -> dict[str, Any]:
    """The access line's fields for one finished request (see the module docstring)."""
    extra = environ.get(ENVIRON_FIELDS, {})
    values = {
        "request_id": request_id(environ),
        "method": environ.get("REQUEST_METHOD"),
        "path": environ.get("PATH_INFO"),
        "status": status,
        "duration_ms": round(duration_s * 1000.0, 2),
        "remote_addr": environ.get("REMOTE_ADDR"),
        "bytes": sent,
    }
    return {name: values.get(name, extra.get(name)) for name in ACCESS_FIELDS}


def _status_code(resp: Response) -> int:
    code = getattr(resp, "status_code", None)
    if isinstance(code, int):
        return code
    try:
        return int(str(resp.status).split(None, 1)[0])
    except (ValueError, IndexError):
        return 0


class GunicornLogger(Logger):
    """gunicorn's logger with ``CAPTIONER_LOG_FORMAT``: JSON error and access lines, or gunicorn's text."""

    def setup(self, cfg: Config) -> None:
        try:
            self.log_format = parse_log_format(os.environ.get("CAPTIONER_LOG_FORMAT", "json"))
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        super().setup(cfg)
        if self.log_format == "json":
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    if getattr(handler, "_gunicorn", False):
                        handler.setFormatter(JsonFormatter())

    def access(self, resp: Response, req: Request, environ: dict[str, Any], request_time: timedelta) -> None:
        if not self.access_log_enabled:
            return
        if self.log_format == "text":
            super().access(resp, req, environ, request_time)
            return
        status = _status_code(resp)
        fields = access_fields(status, environ, request_time.total_seconds(), getattr(resp, "sent", None))
        # 503/504 are the service shedding load, loading or shutting down (documented answers); other 5xx are faults
        level = logging.WARNING if status in (503, 504) else logging.ERROR if status >= 500 else logging.INFO
        self.access_log.log(level, "%s %s %s", fields["method"], fields["path"], status, extra={"fields": fields})


__all__ = [
    "ACCESS_FIELDS",
    "HEADER",
    "LOG_FORMATS",
    "GunicornLogger",
    "JsonFormatter",
    "access_fields",
    "annotate",
    "current_request_id",
    "parse_log_format",
    "request_id",
]
