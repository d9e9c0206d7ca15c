#!/usr/bin/env bash
# `make gpu-rehearsal`: the GPU machine rehearsed here, on the CPU, so that `make bench-gpu` cannot
# rot between GPU leases. It builds a bare Python 3.12 environment holding only what the GPU machine
# ships (benchmarks/gpu_machine.txt: its torch, numpy, numba, timm... and nothing of ffcv, kornia,
# robustness or pydantic), builds .gpu-bundle/ (make gpu-bundle), and runs the suite exactly as
# `make bench-gpu` does there (gpu_suite.py --bundle .gpu-bundle: the wheels installed into a folder
# of their own), with --rehearse: every part and row on the CPU at tiny sizes. It exits non-zero
# when a part fails or a figure of the table is missing.
#
#     make gpu-rehearsal                     # results in benchmarks/results/gpu-suite-rehearsal-cpu<N>.md
#     bash benchmarks/gpu_rehearsal.sh DIR   # results in DIR
#
# The environment (5.4 GB: torch's CUDA build and its libraries, as on the GPU machine) is kept in
# ~/.cache/fasttricks/ under the hash of gpu_machine.txt, so only the first run on a machine or a
# change of the list rebuilds it; uv installs it (under a minute here from the package index, where pip
# took about 4 minutes). The bundle is rebuilt when constraints.txt or gpu_bundle.sh change.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-benchmarks/results}
source benchmarks/py312.sh
start=$SECONDS
CACHE=${FASTTRICKS_CACHE:-$HOME/.cache/fasttricks}
ENV_DIR="$CACHE/gpu-machine-$(sha1sum benchmarks/gpu_machine.txt | cut -c1-12)"
if [ ! -f "$ENV_DIR/.complete" ]; then
  echo "gpu-rehearsal: building the GPU machine's environment in $ENV_DIR"
  rm -rf "$ENV_DIR" "$CACHE/uv-tool"
  mkdir -p "$CACHE"
  "$PY312" -m venv "$CACHE/uv-tool"
  "$CACHE/uv-tool/bin/pip" install -q uv 2>&1 | grep -v "is ignored" || true
  "$CACHE/uv-tool/bin/uv" venv -q -p "$PY312" "$ENV_DIR"
  VIRTUAL_ENV="$ENV_DIR" "$CACHE/uv-tool/bin/uv" pip install -q --no-deps -r benchmarks/gpu_machine.txt
  # pip too: gpu_suite.py installs the bundle with `python3 -m pip`, as on the GPU machine
  VIRTUAL_ENV="$ENV_DIR" "$CACHE/uv-tool/bin/uv" pip install -q pip
  touch "$ENV_DIR/.complete"
fi
echo "gpu-rehearsal: environment ready after $((SECONDS - start)) s"
bundle_source() { cat constraints.txt benchmarks/gpu_bundle.sh | sha1sum | cut -c1-12; }
if [ "$(cat .gpu-bundle/.source 2>/dev/null)" != "$(bundle_source)" ]; then
  bash benchmarks/gpu_bundle.sh .gpu-bundle 2>&1 | grep -v "is ignored" || true
  [ "$(cat .gpu-bundle/.source 2>/dev/null)" = "$(bundle_source)" ] || { echo "gpu-rehearsal: make gpu-bundle failed" >&2; exit 1; }
fi
echo "gpu-rehearsal: bundle ready after $((SECONDS - start)) s"
"$ENV_DIR/bin/python" benchmarks/gpu_suite.py --rehearse --bundle .gpu-bundle --results "$RESULTS"
"$ENV_DIR/bin/python" benchmarks/gpu_suite.py --rehearse --suite tests --bundle .gpu-bundle --results "$RESULTS"
echo "gpu-rehearsal: passed in $((SECONDS - start)) s"
