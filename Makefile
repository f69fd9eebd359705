# The two commands a new user needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision first, pinned to the builds this machine serves; elsewhere any release
# inside pyproject's ranges works.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast lint install dev bench gpu-preflight gpu-wheels clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install $(TORCH_PIN) || $(BIN)/pip install "torch>=2.4" "torchvision>=0.19"
	$(BIN)/pip install -e '.[dev]'
	touch $@

install dev: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/densenets train
	$(BIN)/densenets eval runs/latest
	$(BIN)/densenets summary densenet121
	$(BIN)/densenets paper

# The report test renders the HTML in headless Chromium (Debian's package; CI runs as root).
CHROMIUM := /usr/bin/chromium
# Without root the browser test is skipped (outside CI) rather than failing the whole suite.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else echo "chromium missing and not root: the report's browser test will be skipped"; fi

# Everything (CI runs this), then the 25 slowest tests.
test: $(VENV)/.installed $(CHROMIUM)
	$(BIN)/ruff check src tests benchmarks hubconf.py
	$(BIN)/pytest -q --durations=25

# The edit loop: all but the tests marked slow (over ~5 s) or dist (several processes).
test-fast: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks hubconf.py
	$(BIN)/pytest -q -m "not slow and not dist" --durations=10

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks hubconf.py

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/run.py

# Before every GPU call: the GPU image's versions in a second environment (numpy below 2.4 for
# Triton 3.6's interpreter), every Triton kernel compiled for sm_90, the Triton and compile tests
# under the interpreter and the GPU script's dry run; one line per check.
GPU_VENV := .venv-gpu
GPU_PIN ?= torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy<2.4"
$(GPU_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install -q $(GPU_PIN) pytest pytest-timeout
	$(GPU_VENV)/bin/pip install -q -e . $(GPU_PIN)
	touch $@

# MONAI for the GPU script's 3D rows: the GPU image has none and cannot download, so its wheel
# (pure Python, needing only torch and numpy, both there) travels in .whl/ when the device call
# carries ".whl"; this clone's git exclude file ignores it. The version the tests here ran with.
MONAI_VERSION ?= 1.6.1
MONAI_WHEEL := .whl/monai-$(MONAI_VERSION)-py3-none-any.whl
$(MONAI_WHEEL):
	@exclude="$$(git rev-parse --git-path info/exclude)"; mkdir -p "$$(dirname "$$exclude")"; \
		grep -qxF '/.whl/' "$$exclude" 2>/dev/null || echo '/.whl/' >> "$$exclude"
	rm -f .whl/monai-*.whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl monai==$(MONAI_VERSION)

gpu-wheels: $(MONAI_WHEEL)

gpu-preflight: $(GPU_VENV)/.installed $(MONAI_WHEEL)
	$(GPU_VENV)/bin/python benchmarks/preflight.py

clean:
	rm -rf $(VENV) $(GPU_VENV) .whl build dist src/*.egg-info
