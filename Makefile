# The two set-up commands of the README: `make demo` and `make test`.
# Both create the same virtual environment (.venv) and install hilum into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The exact set CI tested: every package, transitive ones included, at one version (make lock).
# pyproject.toml keeps the compatible ranges, for installing hilum as a library.
LOCK := requirements.lock
STAMP := $(VENV)/.installed
# The lock's resolver, used by `make lock` only; installs use pip, which takes torch from local disk.
UV := uv==0.13.9

.PHONY: demo test venv data clean sysdeps sysdeps-test lock

# pip itself first, at the locked version; then the locked set; then hilum, with no resolution of
# its own (--no-deps) and built by the locked setuptools (--no-build-isolation), so that nothing
# unlocked is ever installed; pip check confirms the set satisfies pyproject.toml.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$$(grep -m1 '^pip==' $(LOCK))"
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

# Refresh the lock from pyproject.toml: its dependencies, the test extra, the build system's
# requirements and pip, resolved for CPython 3.11 on x86-64 Linux (CI, the GPU image, the Dockerfile).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(UV)"
	{ echo pip; $(BIN)/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'], sep='\n')"; } \
	  | $(BIN)/uv pip compile -q pyproject.toml - --extra test --python-version 3.11 \
	      --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -o $(LOCK)

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
