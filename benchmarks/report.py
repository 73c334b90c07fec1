"""Markdown tables and the PNG plot, built only from the suite's JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

IMPLS_PLOTTED = [
    ("rmsprop_jax/donated", "rmsprop_jax donated"),
    ("optax/donated", "optax donated"),
    ("rmsprop_jax/not_donated", "rmsprop_jax not donated"),
    ("optax/not_donated", "optax not donated"),
    ("torch_foreach", "torch foreach"),
]


def _ms(st: dict[str, Any] | None) -> str:
    if not st:
        return "–"
    return f"{st['median_ms']:.3g} ({st['p25_ms']:.3g}–{st['p75_ms']:.3g})"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _mib(b: int | None) -> str:
    if b is None:
        return "–"
    return "0" if b == 0 else f"{b / 2**20:.1f} MiB"


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores"
        + (f", {m['memory_gib']} GiB" if m.get("memory_gib") else "")
        + f"; JAX device: {m['platform']} ({m['device_kind']}). "
        f"jax {m['jax']}, optax {m['optax']}, torch {m.get('torch') or 'not installed'}"
        + (f" ({m['torch_threads']} threads)" if m.get("torch_threads") else "")
        + f". {'Quick mode. ' if data['quick'] else ''}"
        f"{data['settings']['rounds']} interleaved rounds x {data['settings']['steps_per_round']} steps "
        f"per case; {data.get('timestamp_utc', '')}.",
        "",
        "**Step time**, median ms (p25–p75); ratio = rmsprop_jax / optax (< 1: rmsprop_jax faster).",
        "",
        "| workload | config | rmsprop_jax donated | optax donated | ratio | rmsprop_jax not donated "
        "| optax not donated | ratio | torch foreach | rmsprop_jax / torch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in data["groups"]:
        im, r = g["impls"], g["ratios"]
        lines.append(
            f"| {g['workload_description']} | {g['config']} | {_ms(im.get('rmsprop_jax/donated'))} "
            f"| {_ms(im.get('optax/donated'))} | **{_x(r['donated_vs_optax'])}** "
            f"| {_ms(im.get('rmsprop_jax/not_donated'))} | {_ms(im.get('optax/not_donated'))} "
            f"| {_x(r['not_donated_vs_optax'])} | {_ms(im.get('torch_foreach'))} "
            f"| {_x(r['donated_vs_torch'])} |"
        )
    lines += [
        "",
        "**Bandwidth.** Bytes per step = float32 arrays an ideal single pass moves (plain: read g, p, nu, "
        "write p, nu = 20 B/param; centered+momentum: 36 B/param). Triad = donated jitted "
        "`x <- x + 0.5*y` (12 B/element) on one flat buffer of the same size, measured in the same "
        "rounds; bound = bytes / triad bandwidth. 'one leaf' = rmsprop_jax donated on a single leaf "
        "with the workload's total size (the many-leaf ideal).",
        "",
        "| workload | config | MB/step | triad GB/s | bound ms | rmsprop_jax GB/s | fraction of bound "
        "rmsprop_jax / optax | one leaf, same size, ms | triad over the tree, ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in data["groups"]:
        im = g["impls"]
        ours, ref = im.get("rmsprop_jax/donated"), im.get("optax/donated")
        one = im.get("rmsprop_jax/one_leaf_same_size")
        lines.append(
            f"| {g['workload_description']} | {g['config']} | {g['bytes_per_step'] / 1e6:.1f} "
            f"| {g['triad']['flat']['gbps']:.1f} | {g['bound_ms']:.3g} | {ours['gbps']:.1f} "
            f"| {ours['fraction_of_bound']:.2f} / {ref['fraction_of_bound']:.2f} "
            f"| {_ms(one) if one else '–'} | {_ms(g['triad']['tree'])} |"
        )
    lines += [
        "",
        "**Compile and memory.** Compile = `jit(step).lower(...)` + `.compile()`, seconds. Temp = "
        "`compiled.memory_analysis().temp_size_in_bytes` (XLA scratch per step, beyond inputs and "
        "outputs). State = optimizer-state bytes per parameter.",
        "",
        "| workload | config | compile rmsprop_jax / optax, s | ratio | temp donated rmsprop_jax / optax "
        "| temp not donated rmsprop_jax / optax | state B/param rmsprop_jax / optax "
        "| same numbers as optax |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in data["groups"]:
        im, r, nm = g["impls"], g["ratios"], g["numerics_vs_optax"]
        o, od, n, nd = (
            im["rmsprop_jax/donated"],
            im["optax/donated"],
            im["rmsprop_jax/not_donated"],
            im["optax/not_donated"],
        )
        same = "bit-identical" if nm["bit_identical"] else f"max diff {nm['max_abs_diff_params']:.1e}"
        lines.append(
            f"| {g['workload_description']} | {g['config']} "
            f"| {o['lower_plus_compile_s']:.2f} / {od['lower_plus_compile_s']:.2f} "
            f"| **{_x(r['compile_donated_vs_optax'])}** | {_mib(o['temp_bytes'])} / {_mib(od['temp_bytes'])} "
            f"| {_mib(n['temp_bytes'])} / {_mib(nd['temp_bytes'])} "
            f"| {o['state_bytes_per_param']:.2f} / {od['state_bytes_per_param']:.2f} | {same} |"
        )
    loads = [x for g in data["groups"] for x in g["loadavg_1min"] if x is not None]
    if loads:
        lines += ["", f"1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f}."]
    ts = data.get("training_step")
    if ts:
        lines += [
            "",
            f"**Training step** ({ts['model']}, {ts['num_params'] / 1e6:.1f}M params, rmsprop_jax plain): "
            "median ms (p25–p75) and ratio to the whole step in one donated jit.",
            "",
            "| variant | step ms | vs one jit, donated |",
            "|---|---|---|",
        ]
        for v in ts["variants"].values():
            lines.append(f"| {v['description']} | {_ms(v)} | {v['vs_one_jit_donated']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    configs = list(dict.fromkeys(g["config"] for g in data["groups"]))
    fig, axes = plt.subplots(1, len(configs), figsize=(6.5 * len(configs), 4.8), squeeze=False)
    for ax, cfg in zip(axes[0], configs, strict=True):
        groups = [g for g in data["groups"] if g["config"] == cfg]
        x = np.arange(len(groups))
        width = 0.8 / (len(IMPLS_PLOTTED) + 1)
        for k, (key, label) in enumerate(IMPLS_PLOTTED):
            vals = [g["impls"][key]["median_ms"] if key in g["impls"] else np.nan for g in groups]
            lo = [
                v - g["impls"][key]["p25_ms"] if key in g["impls"] else 0
                for v, g in zip(vals, groups, strict=True)
            ]
            hi = [
                g["impls"][key]["p75_ms"] - v if key in g["impls"] else 0
                for v, g in zip(vals, groups, strict=True)
            ]
            ax.bar(x + k * width, vals, width, label=label, yerr=[lo, hi], capsize=2)
        bound = [g["bound_ms"] for g in groups]
        ax.bar(x + len(IMPLS_PLOTTED) * width, bound, width, label="bandwidth bound", color="0.8", hatch="//")
        ax.set_xticks(x + 0.4 - width / 2)
        ax.set_xticklabels([g["workload_description"].replace(", ", "\n", 1) for g in groups], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("step time, ms (median, p25–p75)")
        ax.set_title(cfg)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    m = data["machine"]
    fig.suptitle(f"RMSProp step: {m['cpu_model']} ({m['cpu_cores']} cores), {m['platform']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(data: dict[str, Any], out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(data))
    plot(data, out / "results.png")
