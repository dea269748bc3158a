# The two newcomer commands: `make demo` (a real sparse training run) and `make test`.
PY ?= python3
VENV ?= .venv
TORCH_PINS = torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_PINS)
	$(VENV)/bin/pip install -q -e '.[test,reference]' $(TORCH_PINS)
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST from Debian when apt is usable; otherwise the script finds it or downloads it.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; fi

demo: venv data
	$(VENV)/bin/python -m reference.fashion_mnist

test: venv
	$(VENV)/bin/python -m pytest -q

lint: venv
	$(VENV)/bin/ruff check torchspartan tests benchmarks reference
	$(VENV)/bin/mypy

.PHONY: venv data demo test lint
