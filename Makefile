# Every target installs what it needs into .venv first (a fresh clone needs no other step).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	$(PY) -m nncompress.kernels.cbuild || echo 'C kernels not built: their layers use the plain-torch reference paths'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m nncompress demo --out report

test: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run.py --out BENCHMARKS.md

lint: $(STAMP)
	$(PY) -m ruff check src tests bench

clean:
	rm -rf $(VENV) .cache report bench_out
