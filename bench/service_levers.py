"""gunicorn app factory for ``bench_service.py --levers``: the real service app, with a pre-optimised model.

    BENCH_LEVERS=fold_bn,channels_last CAPTIONER_MODEL=models/flickr8k-lite2 \
        .venv/bin/gunicorn --config service/gunicorn_conf.py "bench.service_levers:create_app()"

Loads the model in the worker (after the fork), applies the ``captioner.perf`` options named in
``BENCH_LEVERS`` and hands it to ``service.app.create_app`` as ``CAPTIONER_INSTANCE``; everything
else (micro-batcher, warm-up, metrics) is the unchanged service.
"""

from __future__ import annotations

import os

import torch
from flask import Flask

from bench.common import apply_levers, parse_levers
from captioner.api import Captioner
from captioner.settings import default_model_path
from service.app import create_app as service_app


def create_app() -> Flask:
    threads = int(os.environ.get("CAPTIONER_TORCH_THREADS", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    cap = Captioner.load(
        os.environ.get("CAPTIONER_MODEL") or default_model_path(),
        device=os.environ.get("CAPTIONER_DEVICE") or None,
        fast=False,
    )
    apply_levers(cap, parse_levers(os.environ.get("BENCH_LEVERS")))
    return service_app({"CAPTIONER_INSTANCE": cap})
