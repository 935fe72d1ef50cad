# Set-up and entry points. `make test` and `make demo` install into .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= test,demo,video
PYTEST_ARGS ?=

.PHONY: install test test-slow test-all demo bench lint clean \
	reproduce-cifar100 reproduce-cifar100-baseline \
	reproduce-imagenet-vitt reproduce-imagenet-vitt-llama \
	reproduce-imagenet-vits reproduce-imagenet-vits-llama \
	reproduce-imagenet-vitb reproduce-imagenet-vitb-llama \
	reproduce-caltech256

$(BIN)/frozenlm: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

install: $(BIN)/frozenlm

test: $(BIN)/frozenlm
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(BIN)/frozenlm
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

test-all: $(BIN)/frozenlm
	$(BIN)/pytest $(PYTEST_ARGS)

demo: $(BIN)/frozenlm
	HF_HUB_OFFLINE=1 $(BIN)/frozenlm fit --config configs/demo.yaml

bench: $(BIN)/frozenlm
	$(BIN)/frozenlm bench

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache *.egg-info
