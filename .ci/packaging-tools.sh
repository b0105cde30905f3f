#!/usr/bin/env bash
# Install what tests/test_packaging.py runs (systemd-analyze and systemd-sysusers from
# `systemd`, rpmbuild and rpm from `rpm`, `rpmlint`, and `make`/`cpio` for the SRPM) on a Debian-based CI machine.
#
#   .ci/packaging-tools.sh [PYTHON]
#
# With PYTHON (the interpreter that runs pytest, e.g. .venv/bin/python), also make sure it
# has the build backend the offline RPM build uses (setuptools>=68 and wheel, from PyPI);
# without them those tests skip. Idempotent: installs only what is missing. apt-get needs
# root, or sudo.
set -euo pipefail

python=${1:-}

missing=()
for tool in systemd-analyze systemd-sysusers rpmbuild rpm rpm2cpio rpmlint make cpio; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "packaging-tools: ${missing[*]} missing; installing systemd rpm rpm2cpio rpmlint make cpio" >&2
    as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        as_root=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    ${as_root[@]+"${as_root[@]}"} apt-get update -qq
    ${as_root[@]+"${as_root[@]}"} apt-get install -y -qq systemd rpm rpm2cpio rpmlint make cpio >/dev/null
fi

if [ -n "$python" ] && ! "$python" - <<'PY'
import importlib.metadata as md
import sys

try:
    setuptools_major = int(md.version("setuptools").split(".")[0])
    md.version("wheel")
except md.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if setuptools_major >= 68 else 1)
PY
then
    echo "packaging-tools: installing setuptools>=68 and wheel into $python" >&2
    "$python" -m pip install -q 'setuptools>=68' wheel
fi
