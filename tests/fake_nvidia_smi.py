"""A stand-in `nvidia-smi` that answers from a JSON state file a test rewrites at will.

$FAKE_NVIDIA_SMI_STATE names the file:
  {"gpus": [{"index": 0, "name": "...", "total": 40960, "used": 4, "free": 40339,
             "util": 0, "temp": 35, "driver": "535.129.03"}],
   "apps": {"<pid>": <MiB>}, "cuda": "12.2", "exit": 0}

It answers the three invocations neuronctl makes: `--query-gpu=<fields>`,
`--query-compute-apps=pid,used_memory` (both with `--format=csv,noheader,nounits`) and the
plain call whose header names the CUDA version. Every call is appended to `<state>.calls`.
"""

from __future__ import annotations

import json
import os
import sys

GPU_FIELDS = {
    "index": "index", "name": "name", "memory.total": "total", "memory.used": "used",
    "memory.free": "free", "utilization.gpu": "util", "temperature.gpu": "temp",
    "driver_version": "driver",
}


def main() -> int:
    path = os.environ["FAKE_NVIDIA_SMI_STATE"]
    with open(path, encoding="utf-8") as fh:
        state = json.load(fh)
    with open(path + ".calls", "a", encoding="utf-8") as fh:
        fh.write(" ".join(sys.argv[1:]) + "\n")
    if state.get("exit"):
        print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")
        return int(state["exit"])
    args = sys.argv[1:]
    for arg in args:
        if arg.startswith("--query-gpu="):
            fields = arg.split("=", 1)[1].split(",")
            unknown = [f for f in fields if f not in GPU_FIELDS]
            if unknown:
                print(f'Field "{unknown[0]}" is not a valid field to query.')
                return 2
            for gpu in state.get("gpus", []):
                print(", ".join(str(gpu.get(GPU_FIELDS[f], "[N/A]")) for f in fields))
            return 0
        if arg.startswith("--query-compute-apps="):
            for pid, mib in state.get("apps", {}).items():
                print(f"{pid}, {mib}")
            return 0
    if not args:
        driver = state["gpus"][0]["driver"] if state.get("gpus") else "535.129.03"
        print(f"| NVIDIA-SMI {driver}    Driver Version: {driver}   "
              f"CUDA Version: {state.get('cuda', '12.2')}     |")
        return 0
    print(f"fake nvidia-smi: unsupported arguments {args}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
