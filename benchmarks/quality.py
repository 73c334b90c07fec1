"""Section ``quality``: training quality with each state format (float32, bf16-SR, int8, int4, FP8).

Models (notebook 02's, copied into :mod:`benchmarks.digits`, float32 parameters): the digits CNN and
the row-by-row GRU, 8 epochs, batch 32, test accuracy after each epoch; and a noisy quadratic,
``f(x) = 0.5 * sum(h * x**2)`` with ``h`` log-spaced over [1e-3, 1] on 65536 coordinates and
N(0, 0.1**2) gradient noise, 4000 steps. Each is trained with every state format of
:mod:`benchmarks.lowmem` (``float32``, ``bf16_sr``, ``int8``, ``int4`` and ``fp8`` (stochastic
rounding, their default), ``int4_nearest``, ``fp8_nearest``), plus ``int8_all`` / ``int4_all`` /
``fp8_all``: the format with ``min_size=0``, every leaf quantized, none kept in float32) under two
configurations with the same effective step size:

* ``plain``: ``rmsprop(lr)`` (decay 0.9);
* ``centered_momentum``: ``rmsprop(lr / 10, centered=True, momentum=0.9)``.

Reported per (model, configuration, format): final test accuracy (mean over the seeds, and each
seed), its difference to the float32 state, the final training loss, the share of accumulator
elements stored quantized (bitsandbytes' and lpmm's rule keeps leaves below 4096 elements in
float32, so the quantized formats do not apply to all of a small model), and the state bytes per
parameter. Full: seeds 0 to 3 (the CNN's final accuracy varies by ~0.9 points between seeds with
the same state format); ``--quick``: seed 0, the CNN for 1 epoch (plain config, float32
and int8_all only) and a 300-step quadratic on 8192 coordinates.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from benchmarks.common import loadavg, machine_line, state_summary
from benchmarks.lowmem import MODES

OUTPUT = "lowmem_quality"
# --quick trains the CNN (plain config) with float32 state and with every leaf in 8 bits only: its
# compiles dominate the quick run; the quadratic takes every format and both configs.
QUICK_MODEL_MODES = ("float32", "int8_all")
LRS = {"cnn": 1e-3, "gru": 3e-3, "quadratic": 1e-3}
CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered_momentum": {"centered": True, "momentum": 0.9, "lr_scale": 0.1},
}


def modes() -> dict[str, dict[str, Any]]:
    """The benchmark's state formats, plus each quantized format on every leaf (``min_size=0``)."""
    return {
        **MODES,
        "int8_all": {"accumulator_dtype": rmsprop_jax.Int8(min_size=0)},
        "int4_all": {"accumulator_dtype": rmsprop_jax.Int4(min_size=0)},
        "fp8_all": {"accumulator_dtype": rmsprop_jax.Fp8(min_size=0)},
    }


def make_tx(model: str, config: str, mode_kw: dict[str, Any]) -> optax.GradientTransformation:
    cfg = dict(CONFIGS[config])
    lr = LRS[model] * cfg.pop("lr_scale", 1.0)
    return rmsprop_jax.rmsprop(lr, **cfg, **mode_kw)


def _accumulators(config: str) -> int:
    cfg = CONFIGS[config]
    return 1 + int(cfg.get("centered", False)) + int(cfg.get("momentum") is not None)


def train_digits(
    model_kind: str, config: str, mode_kw: dict[str, Any], seed: int, epochs: int
) -> dict[str, Any]:
    from flax import nnx

    from benchmarks import digits as ex

    data = ex.digits(split_seed=0)
    model = ex.make_model(model_kind, seed=seed)
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tx = make_tx(model_kind, config, mode_kw)
    t0 = time.perf_counter()
    model, _, hist = ex.fit(model, tx, data, epochs=epochs, seed=seed)
    return {
        "test_acc": hist.test_acc,
        "test_loss": hist.test_loss,
        "train_loss": hist.train_loss,
        "step_loss": hist.step_loss,
        "wall_s": time.perf_counter() - t0,
    } | state_summary(  # the state as init gives it (an NNX state holds 4-bit codes as plain bytes)
        jax.eval_shape(tx.init, nnx.to_pure_dict(nnx.state(model, nnx.Param))),
        num_params,
        _accumulators(config),
    )


def train_quadratic(config: str, mode_kw: dict[str, Any], seed: int, steps: int, n: int) -> dict[str, Any]:
    """Noisy quadratic; the loss recorded every step (noise-free value of f)."""
    h = jnp.asarray(np.logspace(-3, 0, n), jnp.float32)
    init_key, key = jax.random.split(jax.random.key(seed))
    x0 = {"x": jax.random.normal(init_key, (n,), jnp.float32)}
    tx = make_tx("quadratic", config, mode_kw)

    def body(carry: Any, t: Any) -> tuple[Any, Any]:
        x, s = carry
        noise = 0.1 * jax.random.normal(jax.random.fold_in(key, t), (n,), jnp.float32)
        g = {"x": h * x["x"] + noise}
        u, s = tx.update(g, s, x)
        x = optax.apply_updates(x, u)
        return (x, s), 0.5 * jnp.sum(h * x["x"] ** 2)

    t0 = time.perf_counter()
    (_, state), losses = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(steps)))((x0, tx.init(x0)))
    losses = np.asarray(losses, np.float64)
    return {
        "loss": losses[:: max(steps // 400, 1)].tolist(),
        "loss_every": max(steps // 400, 1),
        "final_loss": float(losses[-max(steps // 20, 1) :].mean()),
        "initial_loss": float(0.5 * jnp.sum(h * x0["x"] ** 2)),
        "wall_s": time.perf_counter() - t0,
    } | state_summary(state, n, _accumulators(config))


def run_section(quick: bool, names: set[str], seeds: list[int] | None = None) -> dict[str, Any]:
    """Every model x config x format x seed (``names`` may pick models: cnn, gru, quadratic)."""
    seeds = seeds or ([0] if quick else [0, 1, 2, 3])
    epochs = 1 if quick else 8
    steps, n = (300, 1 << 13) if quick else (4000, 1 << 16)
    models = ("cnn", "quadratic") if quick else ("cnn", "gru", "quadratic")
    if set(models) & names:
        models = tuple(m for m in models if m in names)
    all_modes = modes()
    runs = []
    t0 = time.perf_counter()
    load = [loadavg()]
    for model_kind in models:
        for config in CONFIGS:
            if quick and model_kind != "quadratic" and config != "plain":
                continue  # --quick: the CNN on the plain config only (its compiles dominate)
            for mode, kw in all_modes.items():
                if quick and model_kind != "quadratic" and mode not in QUICK_MODEL_MODES:
                    continue
                for seed in seeds:
                    if model_kind == "quadratic":
                        r = train_quadratic(config, kw, seed, steps, n)
                        summary = f"final loss {r['final_loss']:.4g}"
                    else:
                        r = train_digits(model_kind, config, kw, seed, epochs)
                        summary = f"test acc {100 * r['test_acc'][-1]:.2f} %"
                    runs.append({"model": model_kind, "config": config, "mode": mode, "seed": seed} | r)
                    # Each run compiles new programs, and JAX's caches keep them: ~320 memory maps
                    # per CNN run, so a 4-seed run reached Linux's 65530 and LLVM failed to map.
                    jax.clear_caches()
                    print(
                        f"{model_kind:9s} {config:17s} {mode:11s} seed {seed}: {summary}, "
                        f"{r['bytes_per_param']:.3f} B/param, "
                        f"quantized share {100 * r['quantized_share']:.0f} %, "
                        f"{r['wall_s']:.1f} s",
                        flush=True,
                    )
    load.append(loadavg())
    return {
        "settings": {
            "epochs": epochs,
            "quadratic_steps": steps,
            "quadratic_n": n,
            "seeds": seeds,
            "lrs": LRS,
        },
        "modes": {m: {k: str(v) for k, v in kw.items()} for m, kw in all_modes.items()},
        "configs": {c: {k: str(v) for k, v in kw.items()} for c, kw in CONFIGS.items()},
        "runs": runs,
        "loadavg_1min": load,
        "wall_s": time.perf_counter() - t0,
    }


def summary_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (model, config, mode): means over seeds and the difference to float32."""
    rows = []
    runs = data["runs"]
    for model_kind in ("cnn", "gru", "quadratic"):
        for config in data["configs"]:
            base = None
            for mode in data["modes"]:
                rs = [r for r in runs if (r["model"], r["config"], r["mode"]) == (model_kind, config, mode)]
                if not rs:
                    continue
                if model_kind == "quadratic":
                    value = float(np.mean([r["final_loss"] for r in rs]))
                    per_seed = [r["final_loss"] for r in rs]
                else:
                    value = float(np.mean([100 * r["test_acc"][-1] for r in rs]))
                    per_seed = [100 * r["test_acc"][-1] for r in rs]
                if mode == "float32":
                    base = value
                rows.append(
                    {
                        "model": model_kind,
                        "config": config,
                        "mode": mode,
                        "value": value,
                        "per_seed": per_seed,
                        "vs_float32": None if base is None else value - base,
                        "rel_vs_float32": None if base is None else value / base - 1,
                        "bytes_per_param": rs[0]["bytes_per_param"],
                        "quantized_share": rs[0]["quantized_share"],
                    }
                )
    return rows


def markdown(data: dict[str, Any]) -> str:
    m, st = data["machine"], data["settings"]
    lines = [
        f"Training quality. {machine_line(m)}; load average {data['loadavg_1min']}; {data['timestamp_utc']}. "
        f"{'Quick mode. ' if data['quick'] else ''}"
        f"Digits: {st['epochs']} epochs, batch 32, seeds {st['seeds']}; quadratic: {st['quadratic_steps']} "
        f"steps on {st['quadratic_n']} coordinates. lr {st['lrs']} (x0.1 with momentum 0.9).",
        "",
        "| model | config | state | final test acc % (mean; per seed) | vs float32 (points) "
        "| state B/param | accumulators quantized |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary_rows(data):
        if r["model"] == "quadratic":
            continue
        seeds = ", ".join(f"{v:.2f}" for v in r["per_seed"])
        diff = "–" if r["mode"] == "float32" else f"{r['vs_float32']:+.2f}"
        lines.append(
            f"| {r['model']} | {r['config']} | {r['mode']} | {r['value']:.2f} ({seeds}) | {diff} "
            f"| {r['bytes_per_param']:.3f} | {100 * r['quantized_share']:.0f} % |"
        )
    lines += [
        "",
        "| model | config | state | final loss (mean of last 5 %; per seed) | vs float32 | state B/param "
        "| accumulators quantized |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary_rows(data):
        if r["model"] != "quadratic":
            continue
        seeds = ", ".join(f"{v:.4g}" for v in r["per_seed"])
        diff = "–" if r["mode"] == "float32" else f"{100 * r['rel_vs_float32']:+.2f} %"
        lines.append(
            f"| noisy quadratic | {r['config']} | {r['mode']} | {r['value']:.4g} ({seeds}) | {diff} "
            f"| {r['bytes_per_param']:.3f} | {100 * r['quantized_share']:.0f} % |"
        )
    lines.append("")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(data["configs"])
    fig, axes = plt.subplots(len(configs), 4, figsize=(18, 3.8 * len(configs)), squeeze=False)
    seed0 = data["settings"]["seeds"][0]
    for row, config in enumerate(configs):
        ax = axes[row]
        for j, mode in enumerate(data["modes"]):
            style = {"color": f"C{j}", "label": mode}
            for r in data["runs"]:
                if (r["config"], r["mode"], r["seed"]) != (config, mode, seed0):
                    continue
                if r["model"] == "quadratic":
                    x = np.arange(len(r["loss"])) * r["loss_every"]
                    ax[3].semilogy(x, r["loss"], **style)
                    continue
                col = 0 if r["model"] == "cnn" else 1
                w = 20
                sm = np.convolve(np.asarray(r["step_loss"]), np.ones(w) / w, "valid")
                ax[col].semilogy(sm, **style)
                same = [
                    q
                    for q in data["runs"]
                    if (q["model"], q["config"], q["mode"]) == (r["model"], config, mode)
                ]
                accs = 100 * np.mean([q["test_acc"] for q in same], axis=0)
                ax[2].plot(
                    np.arange(1, len(accs) + 1),
                    accs,
                    marker="o",
                    ms=3,
                    ls="-" if r["model"] == "cnn" else "--",
                    color=style["color"],
                    label=f"{r['model']} {mode}",
                )
        ax[0].set_title(f"CNN train loss, {config}", fontsize=9)
        ax[1].set_title(f"GRU train loss, {config}", fontsize=9)
        ax[2].set_title(f"test acc % (seed mean; CNN -, GRU --; colours as beside), {config}", fontsize=9)
        ax[3].set_title(f"noisy quadratic f(x), {config}", fontsize=9)
        for k, a in enumerate(ax):
            a.grid(alpha=0.3)
            # the accuracy panel's 2 x formats entries would cover its curves
            if k != 2 and a.get_legend_handles_labels()[0]:  # --quick trains no GRU
                a.legend(fontsize=7)
        ax[2].set_ylim(80, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
