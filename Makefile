# fer_lab: the two commands a newcomer needs are `make demo` and `make test`.
# Both create .venv when it is missing or stale (requirements.txt or pyproject.toml
# changed since it was built), install the pinned requirements and `pip install -e .`.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.fer_lab-installed
HASH    = $(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
KERNEL := fer_lab

.PHONY: venv demo test lab bench clean-venv help

help:
	@echo "make demo   - train a small diversified ESR on synthetic faces (outputs/demo/)"
	@echo "make test   - run the test suite"
	@echo "make lab    - start JupyterLab with the fer_lab kernel"
	@echo "make bench  - run the CPU benchmarks (bench/results, bench/RESULTS.md)"

venv:
	@if [ ! -x "$(VPY)" ] || [ "$$(cat $(STAMP) 2>/dev/null)" != "$(HASH)" ]; then \
		echo ">> setting up $(VENV) (requirements changed or missing)"; \
		rm -rf $(VENV) && \
		$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "fer_lab needs Python 3.11, got " + sys.version' && \
		$(PYTHON) -m venv $(VENV) && \
		$(VPY) -m pip install --quiet --upgrade pip && \
		$(VPY) -m pip install --quiet -r requirements.txt && \
		$(VPY) -m pip install --quiet --no-deps --no-build-isolation -e . && \
		$(VPY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (fer_lab)" >/dev/null && \
		echo "$(HASH)" > $(STAMP); \
	fi

demo: venv
	$(VPY) -m fer_lab demo

test: venv
	$(VPY) -m pytest -q

lab: venv
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

bench: venv
	$(VPY) bench/run_all.py

clean-venv:
	rm -rf $(VENV)
