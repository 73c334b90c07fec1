#!/usr/bin/env bash
# What this project runs on a lent GPU machine (one H100/H200, jax+CUDA, optax, flax, torch
# preinstalled; no network). Usage, from the repository root:  bash benchmarks/gpu/run.sh OUT PHASE
#   phase "tests":    the numerics tests that do not need a CPU-only library, on the GPU
#   phase "lowmem":   8-bit / bf16-SR state: codes equal to the CPU's, step-cost ratios incl. a 256M leaf
#   phase "manyleaf": the many-leaf section (default, packed, optax, optax.flatten, one leaf, torch)
# Each part is time-boxed; logs and result files go to OUT.
set -uo pipefail
out=${1:?OUT}; phase=${2:?phase}
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=python3
{ nvidia-smi -L; $py -c "import jax, optax, torch; print('jax', jax.__version__, jax.devices(), 'optax', optax.__version__, 'torch', torch.__version__)"; } >>"$out/env.txt" 2>&1
case $phase in
tests)
  # Several pytest workers share the GPU: no preallocation.
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${TESTS_S:-240}" $py -m pytest -q -p no:cacheprovider -n 8 \
    tests/test_optax_dropin.py tests/test_executor.py tests/test_eager.py tests/test_dtypes.py \
    tests/test_low_memory_state.py tests/test_stochastic_rounding.py \
    ${EXTRA_TESTS:-} >"$out/tests.log" 2>&1
  echo "tests rc=$?"; tail -3 "$out/tests.log" ;;
lowmem)
  timeout 60 $py benchmarks/gpu/codec_cpu_vs_gpu.py >"$out/codec.log" 2>&1; echo "codec rc=$?"; tail -1 "$out/codec.log"
  timeout "${SR_S:-150}" $py benchmarks/stochastic_rounding.py --n 268435456 --steps 10 --rounds 5 >"$out/sr.log" 2>&1
  echo "sr rc=$?"; tail -20 "$out/sr.log"
  timeout "${LOWMEM_S:-200}" $py -m benchmarks.lowmem --big --only "${LOWMEM_ONLY:-leaf_256m,large_leaf,leaves_512,transformer}" --out "$out/lowmem" >"$out/lowmem.log" 2>&1
  echo "lowmem rc=$?"; tail -30 "$out/lowmem.log"; cat "$out/lowmem/lowmem.md" 2>/dev/null | head -60 ;;
manyleaf)
  timeout "${MANYLEAF_S:-420}" $py -m benchmarks.run ${MANYLEAF_ARGS:---only manyleaf} --out "$out/manyleaf" >"$out/manyleaf.log" 2>&1
  echo "manyleaf rc=$?"; tail -40 "$out/manyleaf.log" ;;
esac
