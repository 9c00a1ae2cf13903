# One command each on a fresh machine: `make demo`, `make test`, `make bench`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv chromium demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# headless Chromium for the report's browser test (Debian's package; the tests themselves run without network)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; } \
		|| echo "chromium could not be installed: tests/test_report.py's browser tests will be skipped"

demo: venv
	$(VENV)/bin/fpn demo --output demo-output

test: venv chromium
	scripts/loopback-only $(PY) -m pytest -q

test-fast: venv chromium
	scripts/loopback-only $(PY) -m pytest -q -m "not slow"

bench: venv
	$(PY) benchmarks/neck_cost.py
	$(PY) benchmarks/video_memory.py
	$(PY) benchmarks/report_scale.py
	$(PY) benchmarks/export_memory.py --dedup
	$(PY) benchmarks/startup.py
	$(PY) benchmarks/idle_workers.py
	$(PY) benchmarks/many_images.py
	$(PY) benchmarks/forward_speed.py
	$(PY) benchmarks/fold_norms.py
	$(PY) benchmarks/mask_rle.py
	$(PY) benchmarks/render_clip.py
	scripts/loopback-only $(PY) benchmarks/ranged_reads.py
	scripts/loopback-only $(PY) benchmarks/manifest_lookup.py
	scripts/loopback-only $(PY) benchmarks/daily_rerun.py
	$(PY) benchmarks/worker_niceness.py
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/throughput.py --street --out benchmarks/results/throughput_street.json

clean:
	rm -rf demo-output .pytest_cache
