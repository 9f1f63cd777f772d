# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: setup demo test test-fast docs bench bench-methods bench-real gpu-check data-fashion clean

setup: $(STAMP)

# Idempotent: the venv is (re)installed only when pyproject.toml changed. uv installs the
# ~7 GB of wheels (torch's CUDA build, DALI, DeepSpeed) in well under a minute where pip
# takes about two and a half; pip does it alone when uv cannot be had (UV=0 forces that).
UV ?= 1
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ "$(UV)" = 1 ] && $(BIN)/python -m pip install --quiet --disable-pip-version-check uv \
	    && $(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[test]'; then :; \
	else \
	  $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'; \
	fi
	touch $(STAMP)

demo: setup
	$(BIN)/gppq demo --config configs/demo_digits.yaml

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

# the README's command and configuration reference, generated from the code (tests/test_docs.py
# fails when it drifts)
docs: setup
	$(BIN)/python -m gppq_dist.docs

bench: setup
	$(BIN)/python benchmarks/kmeans_vs_faiss.py
	$(BIN)/python benchmarks/kmeans_whole_model.py
	$(BIN)/python benchmarks/data_loading.py
	$(BIN)/python benchmarks/allreduce_bytes.py
	$(BIN)/python benchmarks/step_time.py

# every method at matched size on the demo data, 3 seeds (about 14 minutes on 2 cores)
bench-methods: setup
	$(BIN)/python benchmarks/compare_methods.py --docs

# every method on Fashion-MNIST (benchmarks/real_data.py): settings searched on val/, test/
# scored once per final model; trains the baseline first when it is not cached (~35 min here)
bench-real: data-fashion
	$(BIN)/python benchmarks/real_data.py --docs

# what only a GPU can show, in one table (benchmarks/results/gpu_check.md), under 8 minutes
# on one GPU; without a CUDA device one line and exit 0
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

# Fashion-MNIST as PNG class folders in data/fashion-mnist (train/ val/ test/); the IDX files
# come from Debian's dataset-fashion-mnist (31 MB), installed here when missing and root.
FASHION_IDX := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
data-fashion: setup
	@if [ ! -f $(FASHION_IDX) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; \
	  else \
	    echo "error: $(FASHION_IDX) is missing: install Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)" >&2; \
	    exit 2; \
	  fi; \
	fi
	$(BIN)/gppq data fashion-mnist --out data/fashion-mnist

clean:
	rm -rf runs data/digits .pytest_cache
