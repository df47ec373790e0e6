# `make demo`: upscale the demo photos with the shipped HAT-demo model and print PSNR/SSIM against bicubic.
# `make test`: create .venv when missing, install the requirements, the optional extras the tests cover (ONNX,
#              the Cog server, plotting) and the package, then lint and run the tests.
# `make serve`: the Cog predictor (predict.py) on Cog's HTTP server at 127.0.0.1:$PORT (default 5000).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_TOOLS := pytest ruff==0.17.6

.PHONY: demo test lint serve install clean-venv

demo: $(STAMP)
	$(PY) scripts/demo.py

test: lint
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

serve: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=$${PORT:-5000} \
		$(PY) -m cog.server.http --host 127.0.0.1

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt $(TEST_TOOLS)
	$(PY) -m pip install -q -e ".[onnx,serve,plot]"
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
