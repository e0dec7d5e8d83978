# omse: every set-up step lives here, so a fresh clone needs only `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
FMNIST  := /usr/share/datasets/fashion-mnist
THREADS ?= 2

.PHONY: demo test test-all bench lint format clean install fmnist

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on this machine's disk (an unpinned torch pulls CUDA)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[models,test]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package.
fmnist:
	@if [ ! -d $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null; then \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist) \
	    || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	  else echo "warning: apt-get missing; Fashion-MNIST tests will skip"; fi; \
	fi

demo: $(STAMP) fmnist
	OMP_NUM_THREADS=$(THREADS) $(BIN)/omse --threads $(THREADS) demo

test: $(STAMP) fmnist
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q -p no:cacheprovider

# Benchmarks are not tests: each prints markdown tables and writes JSON/PNG under results/.
# bench.py also runs benchmarks/transformer.py and benchmarks/peers.py.
bench: $(STAMP) fmnist
	$(BIN)/python -m pip install -q -e '.[bench,nlp]' torch==2.13.0
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/solver_speed.py --threads $(THREADS)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/accuracy.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/bench.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/latency.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/render_readme.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
