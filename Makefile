# The two set-up commands of the README: `make demo` and `make test`.
# Both create the same virtual environment (.venv) and install hilum into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 are pinned in pyproject.toml.
STAMP := $(VENV)/.installed

.PHONY: demo test venv data clean sysdeps sysdeps-test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

data/phantom/train.json: | $(STAMP)
	$(BIN)/hilum shards phantom --out data/phantom --train 2048 --test 384

data: data/phantom/train.json

demo: $(STAMP) sysdeps data/phantom/train.json
	$(BIN)/hilum train --config configs/tiny-clip.yaml --set run.name=tiny-clip-$$(date +%Y%m%d-%H%M%S)

# System packages from Debian, installed when missing (as root, with apt-get): g++ for both
# commands (DeepSpeed JIT-builds its CPU communication op), and the Prometheus server for the
# tests (the monitoring end-to-end test scrapes a real run). Command and package names agree.
define need_packages
	@missing=""; for pkg in $(1); do command -v $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing system packages:$$missing (Debian/Ubuntu: sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi
endef

sysdeps:
	$(call need_packages,g++)

sysdeps-test:
	$(call need_packages,g++ prometheus)

test: $(STAMP) sysdeps-test
	$(BIN)/python -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) data runs
