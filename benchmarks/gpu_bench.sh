#!/usr/bin/env bash
# The GPU extract benchmark (benchmarks/gpu_bench.py) in one offline run of at most 8 minutes:
# what the machine lacks (surgeon itself, mergekit and the small packages it needs) is installed
# from wheels brought along in $WHEELS (default bench-work/wheels), never from the network. mergekit's
# extract needs pydantic, which the GPU image lacks; it comes along too.
#
#   benchmarks/gpu_bench.sh --fetch-wheels                          # beforehand, with network: fill $WHEELS
#   benchmarks/gpu_bench.sh                                         # on the GPU: 7B-shaped, 16 layers, cuda
#   benchmarks/gpu_bench.sh --device cpu --size tiny --layers 1     # dry run anywhere (~40 s)
#
# Extra arguments go to gpu_bench.py (--results FILE writes the figures as JSON, --keep, ...).
# $PYTHON picks the interpreter (default .venv/bin/python where present, else python3); it must
# have torch (with CUDA for the GPU run), safetensors, click, numpy and, for mergekit,
# transformers 5, peft and accelerate.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEELS=${WHEELS:-bench-work/wheels}
MERGEKIT_PKGS=$PWD/bench-work/mergekit-pkgs
SURGEON_PKGS=$PWD/bench-work/surgeon-pkgs

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  "$PYTHON" -m pip download -q --no-deps -d "$WHEELS" "mergekit==0.1.5" "pydantic==2.14.4" \
    "annotated-types==0.8.0" "typing-inspection==0.4.5"
  for version in 3.10 3.11 3.12 3.13; do  # compiled: one wheel per Python
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
      --platform manylinux2014_x86_64 -d "$WHEELS" "immutables==0.21" "pydantic-core==2.50.5"
  done
  ls -l "$WHEELS"
  exit 0
fi

offline_install() {  # offline_install TARGET PACKAGE...: from $WHEELS only, no dependencies resolved
  local target=$1; shift
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --find-links "$WHEELS" --target "$target" "$@"
}

if ! "$PYTHON" -c "import surgeon.formats, surgeon.cli" 2>/dev/null; then  # not installed here: this tree, copied
  [ -d "$SURGEON_PKGS/surgeon" ] || offline_install "$SURGEON_PKGS" .
  export PYTHONPATH=$SURGEON_PKGS${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ! -d "$MERGEKIT_PKGS/mergekit" ] && [ -d "$WHEELS" ]; then
  offline_install "$MERGEKIT_PKGS" mergekit immutables pydantic pydantic-core annotated-types typing-inspection || echo "mergekit did not install from $WHEELS; it is skipped" >&2
fi
exec "$PYTHON" benchmarks/gpu_bench.py --mergekit-path "$MERGEKIT_PKGS" "$@"
