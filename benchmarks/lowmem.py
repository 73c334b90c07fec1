"""Section ``lowmem``: bytes per parameter, step cost and stored-state error of each state format.

State formats (``MODES``), each on float32 parameters, under the suite's two configurations
(plain; centered + momentum 0.9 + coupled weight decay):

* ``float32``: ``rmsprop_jax.rmsprop(...)``, optax's layout (4 B/param per accumulator).
* ``bf16_sr``: ``accumulator_dtype=jnp.bfloat16`` (stochastic rounding, the default for a 16-bit float;
  ``rmsprop_jax.Float(jnp.bfloat16)`` spelled out).
* ``int8``: ``accumulator_dtype="int8"``: 8-bit block-wise codes plus one float32 absmax per block
  of 256 (bitsandbytes' scheme; leaves below 4096 elements keep float32). On a CUDA GPU the library
  steps eligible 8-bit leaves with its fused kernel: the row is what the library chose.
* ``int4``: ``accumulator_dtype="int4"``: two 4-bit codes per byte; the second moment of a matrix
  rank-1 normalized (a float32 maximum per row and per column), other accumulators in blocks of 128
  with a float32 scale each (Li et al. 2023; leaves below 4096 elements keep float32), stochastic
  rounding (the default); ``int4_nearest``: the same rounded to nearest (lpmm's and torchao's).
* ``fp8``: ``accumulator_dtype="fp8"``: float8_e4m3fn codes with a float32 scale per block of 256
  (torchao's scheme), stochastic rounding (the default); ``fp8_nearest``: the same rounded to nearest.
* ``int8_apply`` (step cost only): the same state stepped by ``rmsprop_jax.update_and_apply``
  (the parameter updated inside the optimizer's step) instead of ``update`` + ``apply_updates``.

**torchao** (when installed, CPU only; not in ``--quick``): the cost of low-bit state on both sides
of the fence, one 4M-element leaf: each of our formats' step as a ratio to our float32-state step,
against torchao's ``AdamW8bit`` / ``AdamW4bit`` / ``AdamWFp8`` step as a ratio to
``torch.optim.AdamW`` (float32 state), all interleaved in one process.

**Bytes** are those of ``jax.eval_shape(opt.init, params)`` (nothing allocated, so every workload,
the 256M leaf included, is counted on any machine) over the parameter count; ``quantized_share`` is
the share of accumulator elements stored quantized (8-bit, 4-bit or FP8). **Cost** is the donated
jitted step of each format, all interleaved in rounds in one process, as a ratio to the
float32-state step. **nu error**:
after the timed steps (every format takes the same steps from the same inputs), the relative RMS
distance of ``rmsprop_jax.decode``'d ``nu`` to the float32 state's ``nu``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from benchmarks.common import JaxCase, interleave, loadavg, machine_line, make_tree, state_summary, stats
from benchmarks.workloads import CONFIGS, Config, Workload, _uniform, make_rmsprop_jax, workloads

OUTPUT = "lowmem"
MODES: dict[str, dict[str, Any]] = {
    "float32": {},
    "bf16_sr": {"accumulator_dtype": jnp.bfloat16},
    "int8": {"accumulator_dtype": "int8"},
    "int4": {"accumulator_dtype": "int4"},
    "int4_nearest": {"accumulator_dtype": rmsprop_jax.Int4(rounding="nearest")},
    "fp8": {"accumulator_dtype": "fp8"},
    "fp8_nearest": {"accumulator_dtype": rmsprop_jax.Fp8(rounding="nearest")},
}
COST_ONLY: dict[str, dict[str, Any]] = {"int8_apply": MODES["int8"]}  # stepped by update_and_apply
FUSED_APPLY = {"int8_apply"}

BIG = _uniform("leaf_256m", "1 leaf x 256M", 1, 1 << 28)
# Step cost is not measured on 2000 x 64: every leaf is below the 4096-element minimum,
# so int8 keeps float32 there, and its compile alone takes minutes on 2 cores.
COST_SKIP = {"leaves_2000"}
QUICK_COST = {"large_leaf"}  # --quick times only this one (compiles dominate a quick run)


def accumulators(cfg: Config) -> int:
    return 1 + int(cfg.centered) + int(cfg.momentum is not None)


def state_bytes(wl: Workload, cfg: Config, mode: str) -> dict[str, Any]:
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in wl.shapes.items()}
    state = jax.eval_shape(make_rmsprop_jax(cfg, **MODES[mode]).init, params)
    return state_summary(state, wl.num_params, accumulators(cfg))


def decoded_nu(state: Any) -> list[jax.Array]:
    """Every ``nu`` leaf of the state as float32 (``rmsprop_jax.decode``: any stored format)."""
    nu = optax.tree.get(state, "nu")
    leaves = jax.tree.leaves(nu, is_leaf=lambda x: isinstance(x, rmsprop_jax.QuantizedLeaf))
    return [rmsprop_jax.decode(x) for x in leaves]


def nu_error(ref: list[jax.Array], other: list[jax.Array]) -> float:
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(ref, other, strict=True))
    den = sum(float(jnp.sum(a**2)) for a in ref)
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def measure_cost(
    wl: Workload, cfg: Config, seed: int, rounds: int, per_round: int
) -> dict[str, dict[str, Any]]:
    params = make_tree(wl.shapes, seed=seed)
    grads = make_tree(wl.shapes, seed=100 + seed, scale=1e-2)
    cases = {}
    for mode, kw in {**MODES, **COST_ONLY}.items():
        cases[mode] = JaxCase(
            make_rmsprop_jax(cfg, **kw), params, grads, donate=True, fused_apply=mode in FUSED_APPLY
        )
        print(f"    compiled {mode}: {cases[mode].lower_s + cases[mode].compile_s:.2f} s", flush=True)
    del params
    times = interleave(cases, rounds, per_round)
    base = float(np.median(times["float32"]))
    ref_nu = decoded_nu(cases["float32"].state)
    out = {}
    for mode, case in cases.items():
        st = stats(times[mode])
        st["ratio_to_float32"] = float(np.median(times[mode])) / base
        st["compile_s"] = case.lower_s + case.compile_s
        st["temp_bytes"] = case.temp_bytes
        st["nu_rel_err"] = nu_error(ref_nu, decoded_nu(case.state))
        out[mode] = st
    return out


TORCHAO_SHAPE = (2048, 2048)  # 4M elements, the size of the torchao measurements
# torchao rounds to nearest: the *_nearest rows are the like-for-like ones, the others our defaults
TORCHAO_OPTIMIZERS = {
    "int8": "AdamW8bit",
    "int4": "AdamW4bit",
    "int4_nearest": "AdamW4bit",
    "fp8": "AdamWFp8",
    "fp8_nearest": "AdamWFp8",
}


class _TorchStep:
    """One ``opt.step()`` of a torch optimizer on one parameter with a fixed gradient, timed."""

    def __init__(self, make: Any, p: np.ndarray, g: np.ndarray) -> None:
        import torch

        self.param = torch.nn.Parameter(torch.tensor(p))
        self.param.grad = torch.tensor(g)
        self.opt = make([self.param])

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.opt.step()
        return time.perf_counter() - t0


def torchao_cost(rounds: int, per_round: int) -> dict[str, Any] | None:
    """Our low-bit formats' step cost ratio to our float32 step, beside torchao's to torch's AdamW."""
    try:
        import torch
        import torchao.optim as tao
    except ImportError:
        return None
    if jax.devices()[0].platform != "cpu":
        return None  # torchao's CPU path against a JAX accelerator would compare nothing
    params = make_tree({"w": TORCHAO_SHAPE}, seed=7)
    grads = make_tree({"w": TORCHAO_SHAPE}, seed=8, scale=1e-2)
    p, g = np.asarray(params["w"]), np.asarray(grads["w"])
    cases: dict[str, Any] = {}
    for mode in ("float32", *TORCHAO_OPTIMIZERS):
        kw = MODES[mode]
        cases[f"rmsprop_jax/{mode}"] = JaxCase(rmsprop_jax.rmsprop(1e-3, **kw), params, grads, donate=True)
    cases["torch/AdamW"] = _TorchStep(lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False), p, g)
    for name in dict.fromkeys(TORCHAO_OPTIMIZERS.values()):
        cases[f"torchao/{name}"] = _TorchStep(lambda ps, name=name: getattr(tao, name)(ps, lr=1e-3), p, g)
    times = interleave(cases, rounds, per_round)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "shape": list(TORCHAO_SHAPE),
        "torch": torch.__version__,
        "torchao": getattr(__import__("torchao"), "__version__", "?"),
        "torch_threads": torch.get_num_threads(),
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "ratios": {
            mode: {
                "rmsprop_jax": med[f"rmsprop_jax/{mode}"] / med["rmsprop_jax/float32"],
                "torchao": med[f"torchao/{name}"] / med["torch/AdamW"],
            }
            for mode, name in TORCHAO_OPTIMIZERS.items()
        },
    }


def run_section(quick: bool, names: set[str], big: bool = False) -> dict[str, Any]:
    """Every workload x config x format; the dict that ``lowmem.json`` holds (less the machine)."""
    rounds, per_round = (3, 2) if quick else (8, 3)
    wls = workloads(quick) + ([BIG] if big or BIG.name in names else [])
    picked = {w.name for w in wls} & names
    if picked:
        wls = [w for w in wls if w.name in picked]
    load = [loadavg()]
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
                "bytes": {mode: state_bytes(wl, cfg, mode) for mode in MODES},
                "cost": None,
            }
            if wl.name not in COST_SKIP and (not quick or wl.name in QUICK_COST):
                print(f"  lowmem: {wl.name} ({wl.description}), {cfg.name}", flush=True)
                g["cost"] = measure_cost(wl, cfg, i, rounds, per_round)
                print(
                    "    step ratio to float32 state: "
                    + ", ".join(f"{m} {c['ratio_to_float32']:.2f}" for m, c in g["cost"].items()),
                    flush=True,
                )
            groups.append(g)
    torchao = None if quick or (picked and "torchao" not in names) else torchao_cost(rounds, per_round)
    if torchao is not None:
        print("  torchao side by side: " + json.dumps(torchao["ratios"]), flush=True)
    load.append(loadavg())
    return {
        "torchao": torchao,
        "settings": {"rounds": rounds, "steps_per_round": per_round, "warmup_steps": 2},
        "modes": {m: {k: str(v) for k, v in kw.items()} for m, kw in MODES.items()},
        "cost_only_modes": {m: "int8 stepped by rmsprop_jax.update_and_apply" for m in COST_ONLY},
        "groups": groups,
        "loadavg_1min": load,
        "wall_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- report


def markdown(data: dict[str, Any]) -> str:
    modes = list(data["modes"])
    costed = [g for g in data["groups"] if g["cost"] is not None]
    cmodes = list(costed[0]["cost"]) if costed else modes
    lines = [
        f"Low-memory state. {machine_line(data['machine'])}. {'Quick mode. ' if data['quick'] else ''}"
        f"{data['settings']['rounds']} interleaved rounds x {data['settings']['steps_per_round']} steps; "
        f"load average {data['loadavg_1min']}; {data['timestamp_utc']}.",
        "",
        "**State bytes per parameter** (`jax.eval_shape(opt.init, params)`; in brackets: share of "
        "accumulator elements stored quantized).",
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
        "interleaved in one process (`int8_apply`: int8 stepped by `rmsprop_jax.update_and_apply`).",
        "",
        "| workload | config | " + " | ".join(cmodes + [f"{x} / float32" for x in cmodes[1:]]) + " |",
        "|---|---|" + "---|" * (2 * len(cmodes) - 1),
    ]
    for g in costed:
        c = g["cost"]
        ms = [f"{c[x]['median_ms']:.3g} ({c[x]['p25_ms']:.3g}–{c[x]['p75_ms']:.3g})" for x in cmodes]
        ratios = [f"**{c[mode]['ratio_to_float32']:.2f}**" for mode in cmodes[1:]]
        lines.append(f"| {g['workload_description']} | {g['config']} | " + " | ".join(ms + ratios) + " |")
    lines += [
        "",
        "**Compile** (lower + compile of the donated step), seconds; **nu error**: relative RMS distance "
        "of the decoded `nu` to the float32 state's after the same steps.",
        "",
        "| workload | config | "
        + " | ".join([f"compile {x}" for x in cmodes] + [f"nu error {x}" for x in cmodes[1:]])
        + " |",
        "|---|---|" + "---|" * (2 * len(cmodes) - 1),
    ]
    for g in costed:
        c = g["cost"]
        cells = [f"{c[x]['compile_s']:.2f}" for x in cmodes]
        cells += [f"{c[x]['nu_rel_err']:.1e}" if "nu_rel_err" in c[x] else "–" for x in cmodes[1:]]
        lines.append(f"| {g['workload_description']} | {g['config']} | " + " | ".join(cells) + " |")
    tao = data.get("torchao")
    if tao:
        lines += [
            "",
            f"**Beside torchao** {tao['torchao']} (torch {tao['torch']}, {tao['torch_threads']} threads), "
            f"one {' x '.join(map(str, tao['shape']))} leaf, interleaved: the low-bit step as a ratio to the "
            "same library's float32-state step (ours: RMSProp, `rmsprop_jax.rmsprop`; torchao's: AdamW, "
            "against `torch.optim.AdamW`). Median ms in brackets.",
            "",
            "| state | rmsprop_jax / its float32 | torchao / torch AdamW |",
            "|---|---|---|",
        ]
        ms = tao["median_ms"]
        for mode, name in TORCHAO_OPTIMIZERS.items():
            r = tao["ratios"][mode]
            lines.append(
                f"| {mode} | **{r['rmsprop_jax']:.2f}** ({ms[f'rmsprop_jax/{mode}']:.3g} / "
                f"{ms['rmsprop_jax/float32']:.3g}) | **{r['torchao']:.2f}** ({ms[f'torchao/{name}']:.3g} / "
                f"{ms['torch/AdamW']:.3g}, {name}) |"
            )
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
    cmodes = list(costed[0]["cost"])[1:] if costed else []
    xc = np.arange(len(costed))
    wc = 0.8 / max(len(cmodes), 1)
    for j, mode in enumerate(cmodes):
        ax_c.bar(
            xc + j * wc,
            [g["cost"][mode]["ratio_to_float32"] for g in costed],
            wc,
            label=mode,
            color=f"C{j + 1}",
        )
    ax_c.axhline(1.0, color="k", lw=1)
    ax_c.set_xticks(
        xc + wc * (len(cmodes) - 1) / 2,
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
