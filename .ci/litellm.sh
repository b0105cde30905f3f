#!/usr/bin/env bash
# Install LiteLLM's proxy into its own venv so tests/test_fleet_litellm.py runs the fleet
# recipe (docs/fleet.md) against the real gateway. Its dependency tree is large and pins
# versions of its own; keeping it out of .venv keeps neuronctl's environment what
# pyproject says it is.
#
# Pinned to the version the tests were run with: the newest 1.108 whose [proxy] extra
# resolves from the registry here (later 1.108.x need a litellm-proxy-extras it lacks).
# Never 1.107.0 (a compromised release).
# Never fatal: if the install fails, the test module skips with its reason and CI goes on.
set -uo pipefail
cd "$(dirname "$0")/.."

spec='litellm[proxy]==1.108.7'
venv=.cache/litellm-venv
if [ -x "$venv/bin/litellm" ] && LITELLM_LOCAL_MODEL_COST_MAP=True "$venv/bin/python" -c 'import litellm.proxy.proxy_server' 2>/dev/null; then
    echo "litellm: using $venv ($("$venv/bin/python" -m pip show litellm 2>/dev/null | sed -n 's/^Version: //p'))"
    exit 0
fi
started=$(date +%s)
if python3 -m venv "$venv" \
    && "$venv/bin/python" -m pip install --quiet --upgrade pip \
    && "$venv/bin/python" -m pip install --quiet "$spec" \
    && LITELLM_LOCAL_MODEL_COST_MAP=True "$venv/bin/python" -c 'import litellm.proxy.proxy_server'; then
    echo "litellm: installed $spec in $venv in $(( $(date +%s) - started )) s"
else
    echo "litellm: install failed; the proxy tests will skip" >&2
    rm -rf "$venv"
fi
exit 0
