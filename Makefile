# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs mimfm into it first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mimfm-installed
DEMO   ?= demo_out
# The CPU wheel of torch 2.13.0 lies on disk on our machines; timm's torchvision may move it to 2.14.1.
TORCH  ?= torch==2.13.0

.PHONY: install test demo clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m data.synth --out $(DEMO)/cohort --n-unlabeled 24 --n-labeled 40 --n-external 12 --seed 0
	$(PY) -m data.prepare --manifest $(DEMO)/cohort/manifest.csv --cache $(DEMO)/cache
	$(PY) -m data.prepare --folder $(DEMO)/cohort/unlabeled --cache $(DEMO)/cache

clean:
	rm -rf $(DEMO)
