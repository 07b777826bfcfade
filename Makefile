# Fresh machine:  make serve         (install + start the service with the shipped model)
#                 make test          (install + run the whole test suite)
#                 make lint          (ruff's rules and format check, the layout rules)
#                 make docker-smoke  (root: build the image with podman, check ready/caption/SIGTERM)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
export HOST PORT

.PHONY: install test serve docker-smoke lint clean onnx

install: $(STAMP)

# Re-installs only when the dependency files change, so repeated runs are quick.
$(STAMP): pyproject.toml requirements.txt requirements-train.txt requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# ruff's rules and format ([tool.ruff] in pyproject.toml), then the layout rules of captioner/ and service/
# (tools/check_layout.py: module and function sizes, private imports, import cycles). All three always run;
# the target fails when any of them does.
lint: install
	@status=0; \
	$(BIN)/python -m ruff check . || status=1; \
	$(BIN)/python -m ruff format --check --output-format concise . || status=1; \
	$(BIN)/python tools/check_layout.py || status=1; \
	exit $$status

# A relative CAPTIONER_MODEL is taken from the folder make was started in (`make -C` changes into
# the checkout; the shell's PWD stays where the user is).
USER_DIR := $(or $(PWD),$(CURDIR))

serve: install
	@if [ -n "$$CAPTIONER_MODEL" ]; then CAPTIONER_MODEL="$$(cd "$(USER_DIR)" && realpath -m -- "$$CAPTIONER_MODEL")"; \
		export CAPTIONER_MODEL; echo "CAPTIONER_MODEL=$$CAPTIONER_MODEL"; fi; \
	exec $(BIN)/gunicorn --config service/gunicorn_conf.py "service.app:create_app()"

# Builds the Dockerfile (podman; no Docker engine needed) and checks the image end to end: /readyz,
# a caption of scikit-image's cat photo over HTTP, the JSON access line, exit status 0 on SIGTERM.
# Root only: it installs podman and debootstraps a base image once (tools/container_smoke.sh).
SMOKE_JPEG := $(VENV)/smoke-chelsea.jpg
docker-smoke: install
	$(BIN)/python -c "import sys; from PIL import Image; from skimage import data; Image.fromarray(data.chelsea()).save(sys.argv[1])" $(SMOKE_JPEG)
	tools/container_smoke.sh . $(SMOKE_JPEG)

# (Re)builds the shipped model's exported encoder for ONNX Runtime from its checkpoint, recipe in its
# config.json (captioner/onnx_export.py); any other folder: make onnx MODEL_DIR=models/NAME. The shipped
# encoder is int8, calibrated on the first 64 Flickr8k train photos of CALIBRATION_DATA (the same bytes on
# rebuild); the fp32 one needs no data: make onnx ONNX_PRECISION=fp32.
MODEL_DIR ?= models/flickr8k-lite2
ONNX_PRECISION ?= int8
CALIBRATION_DATA ?= ../shared/data/flickr8k
onnx: install
	$(BIN)/python -m captioner.onnx_export $(MODEL_DIR) --precision $(ONNX_PRECISION) \
		$(if $(filter int8,$(ONNX_PRECISION)),--calibration-data $(CALIBRATION_DATA))

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
