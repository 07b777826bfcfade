"""JSON errors: every failure is ``{"error": {"code": ..., "message": ..., "request_id": ...}}`` with a fitting status.

Handlers cover the service's own :class:`ApiError`, every Werkzeug HTTP error
(404, 405, 413 from ``MAX_CONTENT_LENGTH``, ...) and, as a last resort, any
other exception (500 ``internal``, logged with its traceback, worker kept alive).
"""

from __future__ import annotations

import logging
import re

from flask import Flask, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

from .logs import request_id

log = logging.getLogger("service")

#: Werkzeug status -> machine-readable code.
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    429: "too_many_requests",
    431: "headers_too_large",
    500: "internal",
    501: "not_implemented",
    503: "unavailable",
}

_PATH = re.compile(r"""(?<![\w.<>/])(?:~|\.{1,2})?(?:/[^\s'"<>/]+)+/?""")


def public_message(message: str) -> str:
    """Drop object reprs ("<_io.BytesIO object at 0x...>") and file system paths from messages that are
    answered to clients (paths are logged, never sent)."""
    return _PATH.sub("<path>", re.sub(r"\s*<[^<>]* object at 0x[0-9a-fA-F]+>", "", message))


class ApiError(Exception):
    """An error answered as JSON: ``status`` (HTTP), ``code`` (machine readable), ``message`` (for people)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    error = {"code": code, "message": message}
    if has_request_context():
        error["request_id"] = request_id(request.environ)
    response = jsonify({"error": error})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            length = request.content_length
            if limit and (length is None or length > limit):
                message = f"the request body is larger than the limit of {limit / 2**20:.3g} MiB"
            else:  # Werkzeug's form limits (Flask's MAX_FORM_MEMORY_SIZE / MAX_FORM_PARTS), not the body size
                message = (
                    f"the form has a text field above {request.max_form_memory_size} bytes or more than "
                    f"{request.max_form_parts} parts; send the image as the 'image' file field"
                )
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return error_response(status, HTTP_CODES.get(status, "http_error"), message, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if isinstance(exc, HTTPException):  # pragma: no cover - routed above
            return _http_error(exc)
        log.exception("unhandled error")
        return error_response(500, "internal", "internal error while handling the request")
