# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: demo test lint bench golden clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first, so the torch extra never pulls a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[torch,dev]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/iropt run golden_models/demo.opt golden_models/conv_bn.onnx -o out/conv_bn.opt.onnx \
		--inputs golden_models/conv_bn.inputs.npz --report out/conv_bn.report.json
	$(BIN)/iropt inspect out/conv_bn.opt.onnx

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/run.py

golden: $(STAMP)
	$(BIN)/python golden_models/build.py

clean:
	rm -rf $(VENV) out build dist *.egg-info
