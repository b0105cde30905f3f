#!/usr/bin/env bash
# Debian's redis-server, for tests/fleet/test_warm_first_litellm.py: two LiteLLM proxies
# sharing cooldowns through a real Redis (docs/fleet.md, "Several proxies"). Installed from
# the Debian package registry, which CI (root) can reach; skipped when it is there already.
# Never fatal: without it the Redis test skips with its reason and CI goes on.
set -uo pipefail

if command -v redis-server >/dev/null; then
    echo "redis: using $(command -v redis-server) ($(redis-server --version 2>/dev/null | cut -d' ' -f3))"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "redis: not root or no apt-get; the Redis test will skip" >&2
    exit 0
fi
log=$(mktemp)
if apt-get update >"$log" 2>&1 \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        redis-server >>"$log" 2>&1; then
    echo "redis: installed $(redis-server --version 2>/dev/null | cut -d' ' -f3)"
    # The package starts a system instance; the test starts its own on a free port.
    systemctl disable --now redis-server >/dev/null 2>&1 || true
else
    echo "redis: apt-get install redis-server failed; the Redis test will skip" >&2
    tail -n 20 "$log" >&2
fi
rm -f "$log"
exit 0
