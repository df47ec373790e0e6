# `make demo`: upscale the demo photos with the shipped HAT-demo model and print PSNR/SSIM against bicubic.
# `make test`: create .venv when missing, install the requirements and the package, run the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-venv

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt pytest
	$(PY) -m pip install -q -e .
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
