# The two set-up commands of the README: `make demo` and `make test`.
PY ?= python3

.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m edgefed.cli demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/kernel_speed.py
