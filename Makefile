# omse: every set-up step lives here, so a fresh clone needs only `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed
FMNIST  := /usr/share/datasets/fashion-mnist
THREADS ?= 2
# AIMET's PyPI wheel requires torchvision, which breaks the CPU torch here: it is installed with
# --no-deps into its own folder (with the pure-Python packages it imports) and handed to
# benchmarks/peers.py via OMSE_AIMET_PATH; peers.py records it as refused if that fails.
AIMET   := .aimet
AIMET_PKGS := aimet-torch==2.42.0 attrs==26.1.0 bokeh==3.6.3 colorcet==3.2.1 holoviews==1.23.2 \
  hvplot==0.12.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 onnx-ir==1.1.0 \
  onnxscript==0.7.2 osqp==1.1.3 pandas==3.1.1 panel==1.9.4 param==2.4.2 pyviz-comms==3.0.6 \
  referencing==0.37.0 rpds-py==2026.9.1 tornado==6.6.1 xyzservices==2026.9.1
# ONNX in: the `onnx` extra of pyproject.toml, installed with --no-deps (see there)
ONNX_PKGS := onnx2torch==1.5.15
OCR_PKGS  := rapidocr-onnxruntime==1.4.4

.PHONY: demo test test-all bench lint format clean install fmnist docs

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on this machine's disk (an unpinned torch pulls CUDA)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[models,test,openvino,tflite]'
	# the `onnx` extra without its dependencies (onnx2torch requires torchvision; rapidocr, whose
	# OCR models the tests convert, requires opencv): see pyproject.toml
	$(BIN)/python -m pip install -q --no-deps $(ONNX_PKGS)
	$(BIN)/python -m pip install -q --no-deps $(OCR_PKGS) \
	  || echo "warning: rapidocr-onnxruntime did not install; the OCR import tests will skip"
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

# The documentation site (mkdocs.yml, docs/): built into build/site with warnings as errors.
# Its CLI reference and benchmark tables are generated at build time (scripts/docs_hooks.py).
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[docs]' torch==2.13.0
	touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# the docs build first (a broken link or a stale reference fails the run), then the suite
test: $(STAMP) fmnist docs
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q -p no:cacheprovider

# Benchmarks are not tests: each prints markdown tables and writes JSON/PNG under results/.
# bench.py also runs benchmarks/transformer.py and benchmarks/peers.py.
$(AIMET)/.installed: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps --target $(AIMET) $(AIMET_PKGS) \
	  || echo "warning: aimet-torch did not install; peers.py will record AIMET as refused"
	mkdir -p $(AIMET) && touch $@

bench: $(STAMP) fmnist $(AIMET)/.installed
	$(BIN)/python -m pip install -q -e '.[peers,transformers]' torch==2.13.0
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/solver_speed.py --threads $(THREADS)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/accuracy.py
	OMSE_AIMET_PATH=$(CURDIR)/$(AIMET) OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/bench.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/latency.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/transformer_latency.py --threads $(THREADS)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/transformer_targets.py --threads $(THREADS)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/targets.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/rounding.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/rounding.py --zoo
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/parity.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/memory.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/ocr.py --threads $(THREADS)
	if [ -d ../shared/data/detection ]; then OMP_NUM_THREADS=$(THREADS) $(BIN)/python \
	  benchmarks/detection.py --data ../shared/data --threads $(THREADS); \
	  else echo "benchmarks/detection.py skipped: no ../shared/data/detection"; fi
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/calibration_speed.py --repeats 5
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python benchmarks/calibration_profile.py --threads $(THREADS)
	$(BIN)/python benchmarks/render_readme.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(AIMET) build *.egg-info .pytest_cache .ruff_cache
