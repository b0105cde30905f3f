#!/usr/bin/env bash
# Debian's chromium and chromium-driver, for tests/test_dashboard_browser.py (the dashboard
# in a real headless browser, driven by Selenium from the test extra). Installed from the
# Debian package registry, which CI (root) can reach; skipped when both are there already.
# Never fatal: without them the browser tests skip with their reason and CI goes on.
set -uo pipefail

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    echo "browser: using $(command -v chromium) and $(command -v chromedriver)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "browser: not root or no apt-get; the browser tests will skip" >&2
    exit 0
fi
log=$(mktemp)
if apt-get update >"$log" 2>&1 \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        chromium chromium-driver >>"$log" 2>&1; then
    echo "browser: installed $(chromium --version 2>/dev/null)"
else
    echo "browser: apt-get install chromium chromium-driver failed; the browser tests will skip" >&2
    tail -n 20 "$log" >&2
fi
rm -f "$log"
exit 0
