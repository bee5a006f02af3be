# fer_lab: the two commands a newcomer needs are `make demo` and `make test`.
# Both create .venv when it is missing or stale (requirements.txt or pyproject.toml
# changed since it was built), install the pinned requirements and `pip install -e .`.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.fer_lab-installed
HASH    = $(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
KERNEL := fer_lab

.PHONY: venv demo test lab bench browser clean-venv help

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

test: venv browser
	$(VPY) -m pytest -q

# tests/test_browser.py drives JupyterLab in Debian's Chromium (no browser download); install it
# where we can (root with apt), otherwise those tests skip
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo ">> installing Debian's chromium for the browser tests"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
				|| echo ">> could not install chromium: the browser tests will skip"; \
		else echo ">> chromium not found (and not root with apt): the browser tests will skip"; fi; }

lab: venv
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

bench: venv
	$(VPY) bench/run_all.py

clean-venv:
	rm -rf $(VENV)
