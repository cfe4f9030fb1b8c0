# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.visrec-installed

.PHONY: venv demo test test-fast clean

# torch/torchvision are installed first with exact pins (pip takes them from local disk here);
# the project keeps ranges, and the constraints file stops any dependency from pulling another torch.
$(STAMP): pyproject.toml Makefile .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c .ci/constraints.txt -e '.[all,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/python -m visrec.data.fixtures >/dev/null || echo "real-face fixtures unavailable: the demo skips that part"
	$(BIN)/visrec demo --out demo-out

# One pytest-xdist worker per core (at most 4), each taking a whole test file at a time, the longest first, and one
# more worker for all tests on the standalone Milvus server, which mostly wait for it (tests/conftest.py). Plain
# `pytest` runs them in one process.
XDIST := -n auto --no-loadscope-reorder

test: venv
	bash scripts/setup-test-env.sh
	$(BIN)/python -m pytest -q --durations=30 $(XDIST)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST)

clean:
	rm -rf $(VENV) demo-out .pytest_cache
