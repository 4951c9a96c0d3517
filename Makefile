# Two entry points for a fresh Debian machine (run as root, or with sudo for apt-get):
#   make demo   install, start the node, push the shared phantom series with storescu, print results
#   make test   install, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := dcmtk dicom3tools orthanc libgdcm-tools postgresql chromium

.PHONY: install system-deps venv demo test bench clean

system-deps:
	@if command -v apt-get >/dev/null && ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; fi

$(PY):
	$(PYTHON) -m venv $(VENV)

venv: $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# torchvision's pure-Python swin_transformer.py is the reference in tests/unit/test_ldctiqa.py; --no-deps keeps
	# the pinned CPU torch (torchvision itself does not import beside it and is never imported by the node)
	$(PY) -m pip install -q --no-deps torchvision==0.28.0

install: system-deps venv

demo: install
	$(VENV)/bin/qa-node --config config.toml demo

test: install
	$(VENV)/bin/python -m pytest -q -ra

clean:
	rm -rf var .pytest_cache
