# speech-ssl: `make demo` and `make test` each work on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-fast test-chaos bench wheel clean

# Creates .venv and installs the package (editable) with its dev and decode extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,decode]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: the pretrain -> finetune -> evaluate -> embed pipeline on the in-repo demo corpus.
demo: $(STAMP)
	$(BIN)/speech-ssl run output_dir=outputs/demo

# The whole test suite: 966 s (16 min) measured on this 2-core machine nearly idle (load average 0.7-2.2, warm
# torch.compile cache), against its 15-minute target (issue 19); CI measured 1369 s before the shared Ray head.
# Under a heavy background load (load average 20-30) the torch.compile tests alone took 18 minutes.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Everything but the slow-marked end-to-end runs (Ray Train and Data runs, pipelines, clusters, jobs, torch.compile,
# CLI subprocesses): 99-113 s measured here at load average 1.5-5 (target 3 minutes, issue 19). Before the tests
# marked slow in this round, the set took 194 s at load average 1.3, and 1109 s at load average 23.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# The chaos trials of tests/test_chaos.py (a few minutes); benchmarks/chaos.py is the full measurement.
test-chaos: $(STAMP)
	$(BIN)/python -m pytest -q -m chaos tests/test_chaos.py

# The wheel in dist/, configs and demo corpus inside: `pip install dist/speech_ssl-0.1.0-py3-none-any.whl`
# works in any environment (docs/INSTALL.md). build/ goes first: setuptools would ship stale files from it.
wheel: $(STAMP)
	rm -rf build dist/speech_ssl-*.whl
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation -w dist .

bench: $(STAMP)
	@echo "benchmarks are scripts: see benchmarks/README.md"

clean:
	rm -rf $(VENV) outputs .pytest_cache
