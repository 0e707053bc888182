VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test test-fast lint demo demo-fast bench clean

setup:
	./scripts/setup.sh

## The test command (README, .ci/run): installs what it needs, lints (ruff, mypy), then runs the
## unit + integration tests.
test: lint
	$(PY) -m pytest tests deploy -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check patchd plugins workers tests deploy
	$(VENV)/bin/ruff format --check patchd plugins workers tests deploy
	$(VENV)/bin/mypy

## The main job: the end-to-end demo.
demo: setup
	$(VENV)/bin/patchd demo

demo-fast: setup
	$(VENV)/bin/patchd demo --fast --approve

clean:
	rm -rf .patchd build *.egg-info
