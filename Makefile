VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install test lint run bench-fit bench-predict bench-quality bench-serve bench-load bench-online bench-optim bench-deps-optim bench-scale clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch is pinned to the local CPU build first, so nothing else pulls a CUDA wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]' torch==2.13.0
	# BackPACK (independent cross-check in the tests) declares torchvision, which must not come in: no deps
	$(PY) bench/install_rivals.py --backpack-only
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check curvature app workers tests bench

bench-deps: $(STAMP)
	$(PY) bench/install_rivals.py

bench-fit: bench-deps
	$(PY) -m bench.fit

bench-predict: bench-deps
	$(PY) -m bench.predict

bench-quality: bench-deps
	$(PY) -m bench.quality

bench-serve: $(STAMP)
	$(PY) -m bench.serve

# kfac-jax (and the jax it runs on) go into the bench environment only; torch stays pinned
bench-deps-optim: $(STAMP)
	$(PY) bench/install_rivals.py --kfac-jax

bench-optim: bench-deps-optim
	$(PY) -m bench.optim

bench-load: $(STAMP)
	$(PY) -m bench.load

bench-online: $(STAMP)
	$(PY) -m bench.online

bench-scale: $(STAMP)
	$(PY) -m bench.scale

run: $(STAMP)
	$(VENV)/bin/kronlap serve --example --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache
