#!/usr/bin/env bash
# Builds the prototype kernel into /tmp (not committed).
# Usage: benchmarks/ffi_prototype/build.sh [PYTHON] [OUT.so]
set -euo pipefail
PY=${1:-/tmp/venv/bin/python}
OUT=${2:-/tmp/rmsprop_ffi/librmsprop_ffi.so}
HERE=$(cd "$(dirname "$0")" && pwd)
INC=$("$PY" -c 'import jax; print(jax.ffi.include_dir())')
mkdir -p "$(dirname "$OUT")"
# -ffp-contract=off: g++ forms no FMA; the kernel places the FMAs XLA:CPU forms explicitly -> same bits.
# -fno-math-errno: lets sqrtf vectorize (IEEE sqrt is still correctly rounded; no -ffast-math).
# x86-64 with AVX2+FMA is required (the rsqrt emulation uses rsqrtps + FMA).
CXXFLAGS=${CXXFLAGS:-"-O3 -mavx2 -mfma"}
g++ -std=c++17 $CXXFLAGS -ffp-contract=off -fno-math-errno -fPIC -shared \
    -I"$INC" "$HERE/rmsprop_ffi.cc" -o "$OUT"
echo "$OUT"
