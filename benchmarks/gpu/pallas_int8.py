"""The fused 8-bit Pallas kernel on a GPU: agreement with the XLA path, and step cost.

    python benchmarks/gpu/pallas_int8.py [--n 268435456] [--sweep 32x4,64x4,...] [--configs plain,...]

1. **Agreement** (8M-element leaf, 5 steps, both configurations): the kernels
   ``pallas`` and ``pallas_state`` against ``kernel="xla"`` on the same device: share of
   codes that differ (and by how much), largest relative difference of the parameters;
   and the GPU kernel's codes against the CPU's XLA path (which equals bitsandbytes).
2. **Cost**: the donated jitted step (update + apply_updates, the suite's ``JaxCase``) on
   one leaf of ``--n`` elements for float32, bf16-SR and int8 state, int8 through XLA and
   through the kernel at each ``rows x num_warps`` of ``--sweep``; interleaved in one
   process, as ratios to the float32-state step; ``int8_pallas_apply`` is the kernel stepped
   with ``rmsprop_jax.update_and_apply`` (the parameter updated inside the kernel).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[2] / "src")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from benchmarks.run import JaxCase, interleave  # noqa: E402
from benchmarks.workloads import CONFIGS, make_rmsprop_jax  # noqa: E402

from rmsprop_jax import Blockwise, _executor, _pallas_int8  # noqa: E402


def _opt(cfg: Any, mode: str) -> Any:
    if mode == "float32":
        return make_rmsprop_jax(cfg)
    if mode == "bf16_sr":
        return make_rmsprop_jax(cfg, accumulator_dtype=jnp.bfloat16, stochastic_rounding=True)
    kernel = {"int8": "xla", "int8_pallas_state": "pallas_state"}.get(mode, "pallas")  # _apply: "pallas"
    return make_rmsprop_jax(cfg, accumulator_dtype="int8", quantization=Blockwise(kernel=kernel))


def _set_tiling(rows: int, warps: int) -> None:
    _pallas_int8.ROWS, _pallas_int8.NUM_WARPS = rows, warps
    _executor._leaf_fn.cache_clear()
    jax.clear_caches()


def agreement(shape: tuple[int, ...], steps: int = 5) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    p0 = {"w": rng.standard_normal(shape).astype(np.float32)}
    grads = [
        {"w": (rng.standard_normal(shape) * 10.0 ** rng.uniform(-5, 1, shape)).astype(np.float32)}
        for _ in range(steps)
    ]

    def run(cfg: Any, mode: str, device: Any) -> tuple[Any, Any]:
        opt = _opt(cfg, mode)
        params = jax.device_put(p0, device)
        state = opt.init(params)
        update = jax.jit(opt.update)
        for g in grads:
            u, state = update(jax.device_put(g, device), state, params)
            params = optax.apply_updates(params, u)
        return jax.device_get(params), jax.device_get(state)

    gpu, cpu = jax.devices()[0], jax.devices("cpu")[0]
    rows = []
    for cfg in CONFIGS:
        ref_p, ref_s = run(cfg, "int8", gpu)
        ref_codes = [x for x in jax.tree.leaves(ref_s) if getattr(x, "dtype", None) == np.uint8]
        for mode, dev in (("int8_pallas", gpu), ("int8_pallas_state", gpu), ("int8", cpu)):
            p, s = run(cfg, mode, dev)
            codes = [x for x in jax.tree.leaves(s) if getattr(x, "dtype", None) == np.uint8]
            diff = np.concatenate(
                [np.abs(a.astype(int) - b.astype(int)).ravel() for a, b in zip(codes, ref_codes, strict=True)]
            )
            rel = np.abs(p["w"] - ref_p["w"]).max() / np.abs(ref_p["w"] - p0["w"]).max()
            row = {
                "config": cfg.name,
                "mode": mode,
                "device": dev.platform,
                "codes_differing": float((diff > 0).mean()),
                "max_code_diff": int(diff.max()),
                "param_max_diff_over_motion": float(rel),
            }
            rows.append(row)
            print("  agree", json.dumps(row), flush=True)
    return rows


def cost(n: int, sweep: list[tuple[int, int]], configs: list[str], rounds: int) -> list[dict[str, Any]]:
    out = []
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal(n, dtype=np.float32))}
    grads = {"w": jnp.asarray(1e-2 * rng.standard_normal(n, dtype=np.float32))}
    for cfg in [c for c in CONFIGS if c.name in configs]:
        cases: dict[str, Any] = {}
        compile_s = {}
        for mode in ["float32", "bf16_sr", "int8"]:
            cases[mode] = JaxCase(_opt(cfg, mode), params, grads, donate=True)
        for rows, warps in sweep:
            _set_tiling(rows, warps)
            for variant in ("int8_pallas", "int8_pallas_state", "int8_pallas_apply"):
                name = f"{variant}_{rows}x{warps}"
                try:
                    apply = variant == "int8_pallas_apply"
                    cases[name] = JaxCase(_opt(cfg, variant), params, grads, True, fused_apply=apply)
                except Exception as e:  # report and go on: a tiling Triton cannot compile
                    print(f"  {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        for name, c in cases.items():
            compile_s[name] = round(c.lower_s + c.compile_s, 2)
        times = interleave(cases, rounds, 3)
        base = float(np.median(times["float32"]))
        row = {
            "config": cfg.name,
            "n": n,
            "float32_ms": base * 1e3,
            "ratio_to_float32": {k: round(float(np.median(v)) / base, 3) for k, v in times.items()},
            "compile_s": compile_s,
        }
        out.append(row)
        print("  cost", json.dumps(row), flush=True)
        del cases
    _set_tiling(32, 4)
    return out


def diagnose(n: int, rounds: int) -> list[dict[str, Any]]:
    """Where the kernel's time goes: the step stepped with ``update_and_apply``, with the quantizer's
    table read (LUT: ``k >> 8``), the map's (decode: ``code / 255``) or both replaced by wrong but
    gather-free arithmetic."""
    real = _pallas_int8._read

    def fake(which: set[str]) -> Any:
        def read(ref: Any, index: Any) -> Any:
            if ref.shape[0] == 256 and "map" in which:
                return index.astype(jnp.float32) * (1 / 255)
            if ref.shape[0] == 65536 and "lut" in which:
                return (index >> 8).astype(jnp.uint8)
            return real(ref, index)

        return read

    out = []
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal(n, dtype=np.float32))}
    grads = {"w": jnp.asarray(1e-2 * rng.standard_normal(n, dtype=np.float32))}
    for cfg in CONFIGS:
        cases: dict[str, Any] = {"float32": JaxCase(_opt(cfg, "float32"), params, grads, donate=True)}
        for label, which in (
            ("", set()),
            ("_fake_lut", {"lut"}),
            ("_fake_map", {"map"}),
            ("_fake_both", {"lut", "map"}),
        ):
            _pallas_int8._read = fake(which)  # type: ignore[assignment]
            _set_tiling(32, 4)
            cases["int8_pallas_apply" + label] = JaxCase(
                _opt(cfg, "int8_pallas"), params, grads, True, fused_apply=True
            )
        _pallas_int8._read = real  # type: ignore[assignment]
        _set_tiling(32, 4)
        times = interleave(cases, rounds, 3)
        base = float(np.median(times["float32"]))
        ratios = {k: round(float(np.median(v)) / base, 3) for k, v in times.items()}
        row = {"config": cfg.name, "ratio_to_float32": ratios}
        out.append(row)
        print("  diagnose", json.dumps(row), flush=True)
        del cases
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 28)
    ap.add_argument("--sweep", default="8x4,32x4,64x4,32x8,128x8")
    ap.add_argument("--configs", default="plain,centered_momentum_wd")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--diagnose", action="store_true", help="only the gather-free comparison")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    print("devices", jax.devices(), "jax", jax.__version__, flush=True)
    t0 = time.time()
    result: dict[str, Any] = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    if args.diagnose:
        result["diagnose"] = diagnose(args.n, args.rounds)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
        return 0
    if not args.skip_agreement:
        result["agreement"] = agreement((2048, 4096))
        print(f"agreement done in {time.time() - t0:.0f} s", flush=True)
    sweep = [tuple(int(v) for v in s.split("x")) for s in args.sweep.split(",")]
    result["cost"] = cost(args.n, sweep, args.configs.split(","), args.rounds)  # type: ignore[arg-type]
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
