# Fresh machine:  make serve   (install + start the service with the shipped model)
#                 make test    (install + run the whole test suite)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
export HOST PORT

.PHONY: install test serve lint clean

install: $(STAMP)

# Re-installs only when the dependency files change, so repeated runs are quick.
$(STAMP): pyproject.toml requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# A relative CAPTIONER_MODEL is taken from the folder make was started in (`make -C` changes into
# the checkout; the shell's PWD stays where the user is).
USER_DIR := $(or $(PWD),$(CURDIR))

serve: install
	@if [ -n "$$CAPTIONER_MODEL" ]; then CAPTIONER_MODEL="$$(cd "$(USER_DIR)" && realpath -m -- "$$CAPTIONER_MODEL")"; \
		export CAPTIONER_MODEL; echo "CAPTIONER_MODEL=$$CAPTIONER_MODEL"; fi; \
	exec $(BIN)/gunicorn --config service/gunicorn_conf.py "service.app:create_app()"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
