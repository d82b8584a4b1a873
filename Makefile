# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install pinned torch first (an unpinned torch would pull
# a multi-GB build), then this package with its test extras.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.sidscale-installed
export HF_HUB_OFFLINE := 1
export DS_ACCELERATOR := cpu
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast demo lint clean-demo

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Two pytest-xdist workers (one per core of the 2-core CPU machine): each test module is one unit of
# work, modules sharing an expensive session fixture one unit together (tests/conftest.py).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(PY) -m pytest -q $(XDIST)

# What a developer runs between edits (under 2 minutes): everything but the slow and root tests.
test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow and not root"

lint: setup
	$(VENV)/bin/ruff check sidscale tools tests

# FAMILY=vp (default): the VP toy teacher; FAMILY=flow: the flow-matching toy teacher (tools/demo.py)
FAMILY ?= vp
DEMO_RUN ?= runs/demo$(if $(filter flow,$(FAMILY)),-flow,)
demo: setup
	$(PY) tools/demo.py --family $(FAMILY) --run-dir $(DEMO_RUN)
