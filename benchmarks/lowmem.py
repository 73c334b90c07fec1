"""Low-memory optimizer state: bytes per parameter and step cost of each state format.

    python -m benchmarks.lowmem                # suite workloads, ~3-5 minutes on 2 CPU cores
    python -m benchmarks.lowmem --quick        # small sizes, seconds (run by --quick of the suite)
    python -m benchmarks.lowmem --big          # + one 256M-element leaf (a GPU; ~13 GiB device memory)
    python -m benchmarks.lowmem --render benchmarks/results/cpu-2core/lowmem.json
    python -m benchmarks.run --only lowmem     # the same section from the suite's entry point

State formats (``MODES``), each on float32 parameters, under the suite's two
configurations (plain; centered + momentum 0.9 + coupled weight decay):

* ``float32``: ``rmsprop_jax.rmsprop(...)``, optax's layout (4 B/param per accumulator).
* ``bf16_sr``: ``accumulator_dtype=jnp.bfloat16, stochastic_rounding=True``.
* ``int8``: ``accumulator_dtype="int8"``: 8-bit block-wise codes plus one float32
  absmax per block of 256 (bitsandbytes' scheme; leaves below 4096 elements keep float32).
* ``int8_pallas`` (on a GPU only): the same state, stepped by the fused Pallas kernel
  (``quantization=rmsprop_jax.Blockwise(kernel="pallas")``); ``int8_pallas_apply``: the same
  with ``rmsprop_jax.update_and_apply`` in place of ``update`` + ``apply_updates``.

**Bytes** are those of ``jax.eval_shape(opt.init, params)`` (no memory is
allocated, so every workload, the 256M leaf included, is counted on any machine),
divided by the number of parameters; ``quantized`` is the share of the
accumulator elements stored in one byte. **Cost** is the donated jitted step
(``update`` + ``apply_updates``, the suite's ``JaxCase``) of each format, all three
interleaved in rounds in one process, as a ratio to the float32-state step. The
device is JAX's default one, so the same command measures a GPU. Outputs
``lowmem.json``, ``lowmem.md`` and ``lowmem.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: `benchmarks` (which adds src/) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jax
import jax.numpy as jnp
import numpy as np

import benchmarks  # noqa: F401
import rmsprop_jax
from benchmarks.run import JaxCase, _stats, interleave, machine_info, machine_tag, make_tree
from benchmarks.workloads import CONFIGS, Config, Workload, _uniform, make_rmsprop_jax, workloads

ROOT = Path(__file__).resolve().parents[1]

MODES: dict[str, dict[str, Any]] = {
    "float32": {},
    "bf16_sr": {"accumulator_dtype": jnp.bfloat16, "stochastic_rounding": True},
    "int8": {"accumulator_dtype": "int8"},
}
# On a GPU the suite also times the fused Pallas kernel (Blockwise(kernel="pallas")); elsewhere
# Pallas only interprets it, which says nothing about speed.
_PALLAS = {"accumulator_dtype": "int8", "quantization": rmsprop_jax.Blockwise(kernel="pallas")}
KERNEL_MODES: dict[str, dict[str, Any]] = {
    "int8_pallas": _PALLAS,
    "int8_pallas_apply": _PALLAS,  # stepped with rmsprop_jax.update_and_apply (the kernel updates p)
}
FUSED_APPLY = {"int8_pallas_apply"}


def active_modes() -> dict[str, dict[str, Any]]:
    return {**MODES, **(KERNEL_MODES if jax.default_backend() == "gpu" else {})}


BIG = _uniform("leaf_256m", "1 leaf x 256M", 1, 1 << 28)
# Step cost is not measured on 2000 x 64: every leaf is below the 4096-element minimum,
# so int8 keeps float32 there, and its compile alone takes minutes on 2 cores.
COST_SKIP = {"leaves_2000"}
QUICK_COST = {"large_leaf"}  # --quick times only this one (compiles dominate a quick run)


def state_bytes(wl: Workload, cfg: Config, mode: str) -> dict[str, Any]:
    """State bytes per parameter and the share of accumulator elements stored in one byte."""
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in wl.shapes.items()}
    state = jax.eval_shape(make_rmsprop_jax(cfg, **active_modes()[mode]).init, params)
    leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype")]
    total = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)
    one_byte = sum(int(np.prod(x.shape)) for x in leaves if jnp.dtype(x.dtype).itemsize == 1)
    accumulators = 1 + int(cfg.centered) + int(cfg.momentum is not None)
    return {
        "state_bytes": total,
        "bytes_per_param": total / wl.num_params,
        "quantized_share": one_byte / (accumulators * wl.num_params),
    }


def measure_cost(
    wl: Workload, cfg: Config, seed: int, rounds: int, per_round: int
) -> dict[str, dict[str, Any]]:
    params = make_tree(wl.shapes, seed=seed)
    grads = make_tree(wl.shapes, seed=100 + seed, scale=1e-2)
    cases = {}
    for mode, kw in active_modes().items():
        cases[mode] = JaxCase(
            make_rmsprop_jax(cfg, **kw), params, grads, donate=True, fused_apply=mode in FUSED_APPLY
        )
        print(f"    compiled {mode}: {cases[mode].lower_s + cases[mode].compile_s:.2f} s", flush=True)
    del params
    times = interleave(cases, rounds, per_round)
    base = float(np.median(times["float32"]))
    out = {}
    for mode, case in cases.items():
        st = _stats(times[mode])
        st["ratio_to_float32"] = float(np.median(times[mode])) / base
        st["compile_s"] = case.lower_s + case.compile_s
        st["temp_bytes"] = case.temp_bytes
        out[mode] = st
    return out


def run_section(quick: bool, big: bool = False, only: set[str] | None = None) -> dict[str, Any]:
    """Measure every workload x config x mode; the dict that ``lowmem.json`` holds."""
    rounds, per_round = (3, 2) if quick else (8, 3)
    wls = workloads(quick) + ([BIG] if big else [])
    if only:
        wls = [w for w in wls if w.name in only]
    load = [_load()]
    t0 = time.perf_counter()
    groups = []
    for i, wl in enumerate(wls):
        for cfg in CONFIGS:
            g: dict[str, Any] = {
                "workload": wl.name,
                "workload_description": wl.description,
                "num_leaves": wl.num_leaves,
                "num_params": wl.num_params,
                "config": cfg.name,
                "bytes": {mode: state_bytes(wl, cfg, mode) for mode in active_modes()},
                "cost": None,
            }
            if wl.name not in COST_SKIP and (not quick or wl.name in QUICK_COST):
                print(f"  lowmem {wl.name} ({wl.description}), {cfg.name}", flush=True)
                g["cost"] = measure_cost(wl, cfg, i, rounds, per_round)
                print(
                    "    step ratio to float32 state: "
                    + ", ".join(f"{m} {c['ratio_to_float32']:.2f}" for m, c in g["cost"].items()),
                    flush=True,
                )
            groups.append(g)
    load.append(_load())
    return {
        "schema": 1,
        "timestamp_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": quick,
        "machine": machine_info(),
        "settings": {"rounds": rounds, "steps_per_round": per_round, "warmup_steps": 2},
        "modes": {m: {k: str(v) for k, v in kw.items()} for m, kw in active_modes().items()},
        "groups": groups,
        "loadavg_1min": load,
        "wall_s": time.perf_counter() - t0,
    }


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------------- outputs


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    modes = list(data["modes"])
    lines = [
        f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores; JAX device: {m['platform']} "
        f"({m['device_kind']}); jax {m['jax']}. {'Quick mode. ' if data['quick'] else ''}"
        f"{data['settings']['rounds']} interleaved rounds x {data['settings']['steps_per_round']} steps; "
        f"load average {data['loadavg_1min']}; {data['timestamp_utc']}.",
        "",
        "**State bytes per parameter** (`jax.eval_shape(opt.init, params)`; in brackets: share of "
        "accumulator elements stored in 8 bits).",
        "",
        "| workload | config | " + " | ".join(modes) + " | smallest / float32 |",
        "|---|---|" + "---|" * (len(modes) + 1),
    ]
    for g in data["groups"]:
        b = g["bytes"]
        cells = [
            f"{b[mode]['bytes_per_param']:.3f}"
            + (f" ({100 * b[mode]['quantized_share']:.0f} %)" if b[mode]["quantized_share"] else "")
            for mode in modes
        ]
        ratio = min(b[x]["bytes_per_param"] for x in modes) / b["float32"]["bytes_per_param"]
        lines.append(
            f"| {g['workload_description']} | {g['config']} | " + " | ".join(cells) + f" | {ratio:.2f} |"
        )
    lines += [
        "",
        "**Step cost**, donated jitted step, median ms (p25–p75); ratio to the float32-state step, "
        "interleaved in one process.",
        "",
        "| workload | config | " + " | ".join(modes + [f"{x} / float32" for x in modes[1:]]) + " |",
        "|---|---|" + "---|" * (2 * len(modes) - 1),
    ]
    for g in data["groups"]:
        c = g["cost"]
        if c is None:
            continue
        ms = [f"{c[x]['median_ms']:.3g} ({c[x]['p25_ms']:.3g}–{c[x]['p75_ms']:.3g})" for x in modes]
        ratios = [f"**{c[mode]['ratio_to_float32']:.2f}**" for mode in modes[1:]]
        lines.append(f"| {g['workload_description']} | {g['config']} | " + " | ".join(ms + ratios) + " |")
    lines += [
        "",
        "**Compile** (lower + compile of the donated step), seconds.",
        "",
        "| workload | config | " + " | ".join(modes) + " |",
        "|---|---|" + "---|" * len(modes),
    ]
    for g in data["groups"]:
        if g["cost"] is not None:
            cells = [f"{g['cost'][x]['compile_s']:.2f}" for x in modes]
            lines.append(f"| {g['workload_description']} | {g['config']} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(data["modes"])
    groups = data["groups"]
    fig, (ax_b, ax_c) = plt.subplots(1, 2, figsize=(14, 4.8))
    width = 0.8 / len(modes)
    labels = [f"{g['workload_description']}\n{g['config']}" for g in groups]
    x = np.arange(len(groups))
    for j, mode in enumerate(modes):
        ax_b.bar(x + j * width, [g["bytes"][mode]["bytes_per_param"] for g in groups], width, label=mode)
    ax_b.set_xticks(x + width * (len(modes) - 1) / 2, labels, fontsize=7, rotation=30, ha="right")
    ax_b.set_ylabel("state bytes / parameter")
    ax_b.set_title("Optimizer state per parameter")
    ax_b.legend()
    ax_b.grid(axis="y", alpha=0.3)
    costed = [g for g in groups if g["cost"]]
    xc = np.arange(len(costed))
    for j, mode in enumerate(modes[1:]):
        ax_c.bar(
            xc + j * width,
            [g["cost"][mode]["ratio_to_float32"] for g in costed],
            width,
            label=mode,
            color=f"C{j + 1}",
        )
    ax_c.axhline(1.0, color="k", lw=1)
    target = 1.5 if data["machine"]["platform"] == "cpu" else 0.85
    ax_c.axhline(target, color="r", lw=1, ls="--", label=f"target {target}x (large leaves)")
    ax_c.set_xticks(
        xc + width * (len(modes) - 2) / 2,
        [f"{g['workload_description']}\n{g['config']}" for g in costed],
        fontsize=7,
        rotation=30,
        ha="right",
    )
    ax_c.set_ylabel("step time / float32-state step")
    ax_c.set_title(f"Step cost ({data['machine']['platform']}, {data['machine']['device_kind']})")
    ax_c.legend()
    ax_c.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(data: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowmem.json").write_text(json.dumps(data, indent=1))
    (out / "lowmem.md").write_text(markdown(data))
    plot(data, out / "lowmem.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.lowmem", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (seconds)")
    ap.add_argument("--big", action="store_true", help="add one 256M-element leaf (meant for a GPU)")
    ap.add_argument("--only", default=None, help="comma-separated workload names (leaf_256m for the big one)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default results/<machine-tag>)")
    ap.add_argument("--render", type=Path, default=None, help="only rebuild .md/.png from this JSON")
    args = ap.parse_args(argv)
    if args.render is not None:
        data = json.loads(args.render.read_text())
        write_outputs(data, args.out or args.render.parent)
        return 0
    only = set(args.only.split(",")) if args.only else None
    data = run_section(args.quick, big=args.big or bool(only and BIG.name in only), only=only)
    tag = machine_tag(data["machine"]) + ("-quick" if args.quick else "")
    out = args.out or ROOT / "benchmarks" / "results" / tag
    write_outputs(data, out)
    print(f"wrote {out}/lowmem.json, lowmem.md, lowmem.png in {data['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
