# Sourced by gpu_bundle.sh and gpu_rehearsal.sh: PY312, a CPython 3.12 like the GPU machine's
# (PY312=..., else python3.12 on PATH, else pyenv's), or exit 2 saying how to give one.
find_py312() {
  for c in "${PY312:-}" python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python; do
    [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$c"; return; }
  done
  echo "$(basename "$0"): needs a Python 3.12 interpreter (the GPU machine's); set PY312=/path/to/python3.12" >&2
  exit 2
}
PY312=$(find_py312)
