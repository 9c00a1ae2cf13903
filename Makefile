# One command each on a fresh machine: `make demo`, `make test`, `make bench`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(VENV)/bin/fpn demo --output demo-output

test: venv
	scripts/loopback-only $(PY) -m pytest -q

test-fast: venv
	scripts/loopback-only $(PY) -m pytest -q -m "not slow"

bench: venv
	$(PY) benchmarks/neck_cost.py
	$(PY) benchmarks/video_memory.py

clean:
	rm -rf demo-output .pytest_cache
