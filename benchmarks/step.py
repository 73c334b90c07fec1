"""Section ``step``: one optimizer step, rmsprop_jax vs optax vs PyTorch, interleaved.

Per (workload, config) group (:mod:`benchmarks.workloads`), in one process: ``rmsprop_jax.rmsprop``
and ``optax.rmsprop`` (coupled weight decay chained in front), each donated and not, the bandwidth
triads, rmsprop_jax on one leaf of the same total size, and ``torch.optim.RMSprop(foreach=True)``
when PyTorch is installed; all interleaved in rounds. Plus the training-step table: an MLP trained
five ways, from nothing jitted to the whole step in one donated jit. Outputs ``results.json``,
``results.md``, ``results.png``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import (
    JaxCase,
    Timer,
    TorchCase,
    compare_trees,
    copy_tree,
    interleave,
    loadavg,
    make_tree,
    stats,
)
from benchmarks.workloads import CONFIGS, Config, Workload, make_optax, make_rmsprop_jax, workloads

# --------------------------------------------------------------------------- cases


class TriadCase:
    """Donated ``x <- x + 0.5 * y``: 12 bytes per float32 element, the bandwidth yardstick."""

    def __init__(self, x: Any, y: Any) -> None:
        self.x, self.y = copy_tree(x), y
        fn = lambda a, b: jax.tree.map(lambda u, v: u + 0.5 * v, a, b)
        self.compiled = jax.jit(fn, donate_argnums=0).lower(self.x, y).compile()

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.x = self.compiled(self.x, self.y)
        jax.block_until_ready(self.x)
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- one group


def measure_group(
    wl: Workload,
    cfg: Config,
    params: Any,
    grads: Any,
    rounds: int,
    per_round: int,
    torch_device: str | None,
) -> dict[str, Any]:
    load_before = loadavg()
    n = wl.num_params
    jax_cases: dict[str, JaxCase] = {}
    # Interleave the compiles too, so drift hits both implementations' compile times.
    for donate in (True, False):
        for impl, make in (("rmsprop_jax", make_rmsprop_jax), ("optax", make_optax)):
            key = f"{impl}/{'donated' if donate else 'not_donated'}"
            jax_cases[key] = JaxCase(make(cfg), params, grads, donate)
            print(
                f"    compiled {key}: {jax_cases[key].lower_s + jax_cases[key].compile_s:.2f} s", flush=True
            )

    # Numerics sanity check: one step from identical inputs, rmsprop_jax vs optax.
    ours, ref = jax_cases["rmsprop_jax/not_donated"], jax_cases["optax/not_donated"]
    p_ours = ours.one_step(params, make_rmsprop_jax(cfg).init(params))[0]
    p_ref = ref.one_step(params, make_optax(cfg).init(params))[0]
    max_diff, bitwise = compare_trees(p_ours, p_ref)
    del p_ours, p_ref

    cases: dict[str, Timer] = dict(jax_cases)
    flat_x = jnp.zeros((n,), jnp.float32)
    flat_y = jnp.ones((n,), jnp.float32)
    cases["triad/flat"] = TriadCase(flat_x, flat_y)
    cases["triad/tree"] = TriadCase(params, grads)
    if wl.num_leaves > 1:
        flat_case = JaxCase(make_rmsprop_jax(cfg), {"flat": flat_y}, {"flat": flat_y * 1e-2}, True)
        cases["rmsprop_jax/one_leaf_same_size"] = flat_case
    if torch_device is not None:
        cases["torch_foreach"] = TorchCase(cfg, params, grads, torch_device)

    times = interleave(cases, rounds, per_round)
    load_after = loadavg()

    stream_bytes = cfg.stream_count() * 4 * n  # float32
    triad_flat = stats(times["triad/flat"])
    triad_tree = stats(times["triad/tree"])
    bw_flat = 12 * n / (triad_flat["median_ms"] * 1e-3)
    bound_ms = stream_bytes / bw_flat * 1e3
    impls: dict[str, Any] = {}
    for name, case in cases.items():
        if name.startswith("triad/"):
            continue
        st = stats(times[name])
        st["gbps"] = stream_bytes / (st["median_ms"] * 1e-3) / 1e9
        st["fraction_of_bound"] = bound_ms / st["median_ms"]
        if isinstance(case, JaxCase):
            st |= {
                "lower_s": case.lower_s,
                "compile_s": case.compile_s,
                "lower_plus_compile_s": case.lower_s + case.compile_s,
                "temp_bytes": case.temp_bytes,
                "state_bytes_per_param": case.state_bytes_per_param,
            }
        impls[name] = st

    def ratio(a: str, b: str, key: str = "median_ms") -> float | None:
        if a in impls and b in impls and impls[b].get(key):
            return impls[a][key] / impls[b][key]
        return None

    return {
        "workload": wl.name,
        "workload_description": wl.description,
        "num_leaves": wl.num_leaves,
        "num_params": n,
        "config": cfg.name,
        "config_description": cfg.description,
        "bytes_per_step": stream_bytes,
        "triad": {
            "flat": triad_flat | {"gbps": bw_flat / 1e9},
            "tree": triad_tree | {"gbps": 12 * n / (triad_tree["median_ms"] * 1e-3) / 1e9},
        },
        "bound_ms": bound_ms,
        "impls": impls,
        "ratios": {
            "donated_vs_optax": ratio("rmsprop_jax/donated", "optax/donated"),
            "not_donated_vs_optax": ratio("rmsprop_jax/not_donated", "optax/not_donated"),
            "donated_vs_torch": ratio("rmsprop_jax/donated", "torch_foreach"),
            "optax_donated_vs_torch": ratio("optax/donated", "torch_foreach"),
            "compile_donated_vs_optax": ratio("rmsprop_jax/donated", "optax/donated", "lower_plus_compile_s"),
            "compile_not_donated_vs_optax": ratio(
                "rmsprop_jax/not_donated", "optax/not_donated", "lower_plus_compile_s"
            ),
        },
        "numerics_vs_optax": {"bit_identical": bitwise, "max_abs_diff_params": max_diff},
        "loadavg_1min": [load_before, load_after],
    }


# --------------------------------------------------------------------------- fast training step


def measure_training_step(quick: bool, rounds: int, per_round: int) -> dict[str, Any]:
    """The effect of jit, donation and keeping the optimizer in the gradient's jit, on an MLP."""
    import rmsprop_jax

    dims = [128, 256, 10] if quick else [1024, 2048, 2048, 2048, 10]
    batch = 64
    rng = np.random.default_rng(0)
    params = {
        f"layer{i}": {
            "w": jnp.asarray(rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a)),
            "b": jnp.zeros((b,), jnp.float32),
        }
        for i, (a, b) in enumerate(itertools.pairwise(dims))
    }
    x = jnp.asarray(rng.standard_normal((batch, dims[0]), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, dims[-1], batch))
    opt = rmsprop_jax.rmsprop(1e-3)

    def loss_fn(p: Any, x: Any, y: Any) -> Any:
        h = x
        for i in range(len(dims) - 1):
            h = h @ p[f"layer{i}"]["w"] + p[f"layer{i}"]["b"]
            if i < len(dims) - 2:
                h = jax.nn.relu(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    def opt_step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    def full_step(p: Any, s: Any, x: Any, y: Any) -> tuple[Any, Any]:
        return opt_step(p, s, jax.grad(loss_fn)(p, x, y))

    grad_jit = jax.jit(jax.grad(loss_fn))
    opt_jit = jax.jit(opt_step)
    one_jit = jax.jit(full_step)
    one_jit_donated = jax.jit(full_step, donate_argnums=(0, 1))
    variants: dict[str, tuple[str, Callable[..., Any]]] = {
        "eager": (
            "nothing jitted (op-by-op dispatch)",
            lambda p, s: opt_step(p, s, jax.grad(loss_fn)(p, x, y)),
        ),
        "jit_grad_only": (
            "gradient jitted, optimizer op-by-op",
            lambda p, s: opt_step(p, s, grad_jit(p, x, y)),
        ),
        "two_jits": (
            "gradient and optimizer in separate jits",
            lambda p, s: opt_jit(p, s, grad_jit(p, x, y)),
        ),
        "one_jit": ("whole step in one jit, not donated", lambda p, s: one_jit(p, s, x, y)),
        "one_jit_donated": (
            "whole step in one jit, params+state donated",
            lambda p, s: one_jit_donated(p, s, x, y),
        ),
    }

    class Case:
        def __init__(self, fn: Callable[..., Any]) -> None:
            self.fn, self.p = fn, copy_tree(params)
            self.s = opt.init(self.p)

        def __call__(self) -> float:
            t0 = time.perf_counter()
            self.p, self.s = self.fn(self.p, self.s)
            jax.block_until_ready((self.p, self.s))
            return time.perf_counter() - t0

    if quick:  # the op-by-op variants compile every primitive on first use: seconds, not the point here
        variants = {k: v for k, v in variants.items() if k not in ("eager", "jit_grad_only")}
    cases = {k: Case(fn) for k, (_, fn) in variants.items()}
    times = interleave(cases, rounds, per_round)
    out = {k: {"description": variants[k][0]} | stats(times[k]) for k in variants}
    base = out["one_jit_donated"]["median_ms"]
    for v in out.values():
        v["vs_one_jit_donated"] = v["median_ms"] / base
    return {
        "model": f"MLP {dims}, batch {batch}",
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "variants": out,
    }


# --------------------------------------------------------------------------- section


def warm_up() -> None:
    """First compiles in a process pay one-time costs (JAX's own internal jits, caches): pay them
    before any measured compile, so that the first group's compile ratio is not skewed."""
    tiny = make_tree({"w": (4, 4), "b": (4,)}, seed=0)
    for cfg in CONFIGS:
        for make in (make_rmsprop_jax, make_optax):
            for donate in (True, False):
                JaxCase(make(cfg), tiny, tiny, donate)()


def run_section(
    quick: bool, names: set[str], torch_device: str | None, training_step: bool = True
) -> dict[str, Any]:
    """Every selected workload x config group, then the training-step table."""
    rounds, per_round = (3, 2) if quick else (8, 3)
    t_start = time.perf_counter()
    all_wls = workloads(quick)
    picked = {w.name for w in all_wls} & names
    groups = []
    for i, wl in enumerate(all_wls):
        if picked and wl.name not in picked:
            continue
        params = make_tree(wl.shapes, seed=i)
        grads = make_tree(wl.shapes, seed=100 + i, scale=1e-2)
        for cfg in CONFIGS:
            print(f"  step: {wl.name} ({wl.description}), {cfg.name}", flush=True)
            g = measure_group(wl, cfg, params, grads, rounds, per_round, torch_device)
            r = g["ratios"]
            print(
                f"    rmsprop_jax/optax donated {r['donated_vs_optax']:.3f}, not donated "
                f"{r['not_donated_vs_optax']:.3f}, compile {r['compile_donated_vs_optax']:.3f}; "
                f"bound fraction {g['impls']['rmsprop_jax/donated']['fraction_of_bound']:.2f}",
                flush=True,
            )
            groups.append(g)
        del params, grads
    training = None
    if training_step:
        print("  step: training step (jit / donation / optimizer placement)", flush=True)
        training = measure_training_step(quick, rounds, per_round)
    return {
        "settings": {"rounds": rounds, "steps_per_round": per_round, "warmup_steps": 2},
        "groups": groups,
        "training_step": training,
        "wall_s": time.perf_counter() - t_start,
    }


# --------------------------------------------------------------------------- report

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
        + (f"; commit {m['git_commit']}" if m.get("git_commit") else "")
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


OUTPUT = "results"  # results.json, results.md, results.png
