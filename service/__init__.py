"""The captioning web service: a Flask app (``service.app:create_app``) served by gunicorn.

A thin HTTP layer over :mod:`captioner`: uploads are decoded and resized in the
request thread, then micro-batched (:mod:`service.batching`) into one encoder
pass and one batched search per group of compatible requests.
"""

__all__ = ["create_app"]


def create_app(config=None):  # pragma: no cover - thin re-export, keeps imports lazy
    from .app import create_app as _create_app

    return _create_app(config)
