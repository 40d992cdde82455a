# The two set-up commands of the README: `make demo` and `make test`.
# Both create the same virtual environment (.venv) and install hilum into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 are pinned in pyproject.toml.
STAMP := $(VENV)/.installed

.PHONY: demo test venv data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

data/phantom/train.json: | $(STAMP)
	$(BIN)/hilum shards phantom --out data/phantom --train 2048 --test 384

data: data/phantom/train.json

demo: $(STAMP) data/phantom/train.json
	$(BIN)/hilum train --config configs/tiny-clip.yaml --set run.name=tiny-clip-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) data runs
