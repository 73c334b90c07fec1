"""Section ``manyleaf``: trees of many small leaves, each state layout against optax.

Per (tree, config), in one process, interleaved: ``rmsprop_jax.rmsprop`` per leaf (``default``),
``rmsprop_jax.rmsprop(..., packed=True)``, ``optax.rmsprop``, ``optax.flatten(rmsprop_jax.rmsprop(...))``
and rmsprop_jax on **one leaf** of the same total size; on a GPU also
``torch.optim.RMSprop(foreach=True)`` and the same captured in a CUDA graph (``capturable=True``).
Trees: 1500 leaves x 64 and the GPT-like tree (``--quick``: 40 x 64); ``--only manyleaf,<tree>``
also reaches 2000 x 64, 500 x 64 and 2000 x 4k. Three figures each, as ratios to optax's:

- **dispatched**: one donated jitted step (update + apply_updates) per Python call, blocked: what a
  training loop that jits only the step sees (arrays cross the jit boundary every step);
- **in loop**: ``K`` steps inside one jitted ``fori_loop`` (the gradients scaled by a per-iteration
  factor so that nothing is loop-invariant), per step: the compiled work alone, no dispatch;
- **compile**: ``lower + compile`` of the dispatched step;

plus the kernels in the compiled step (the XLA ops of its entry computation that run as kernels) and
the arrays crossing its jit boundary, and a check that ``packed=True`` gives the default's numbers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import TorchCase, compare_trees, interleave, machine_line, make_tree, stats
from benchmarks.workloads import (
    CONFIGS,
    Config,
    Workload,
    _uniform,
    make_optax,
    make_rmsprop_jax,
    make_torch,
    transformer_shapes,
)

IMPLS = ["default", "packed", "optax", "optax.flatten", "one_leaf"]
_NOT_KERNELS = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "opt-barrier"}


OUTPUT = "manyleaf"


def manyleaf_workloads(quick: bool, names: set[str] | frozenset[str] = frozenset()) -> list[Workload]:
    """The default trees, or those of them and of the extra ones named in ``names``."""
    if quick:
        return [_uniform("leaves_40x64", "40 leaves x 64", 40, 64)]
    default = [
        _uniform("leaves_1500x64", "1500 leaves x 64", 1500, 64),
        Workload("gpt", "GPT-like, vocab 32000, d=384, 12 layers", transformer_shapes(32000, 384, 12, 512)),
    ]
    extra = [
        _uniform("leaves_2000x64", "2000 leaves x 64", 2000, 64),
        _uniform("leaves_500x64", "500 leaves x 64", 500, 64),
        _uniform("leaves_2000x4k", "2000 leaves x 4k", 2000, 4096),
    ]
    picked = [w for w in default + extra if w.name in names]
    return picked or default


def make_impl(name: str, cfg: Config) -> optax.GradientTransformation:
    if name == "optax":
        return make_optax(cfg)
    if name == "optax.flatten":
        return optax.flatten(make_rmsprop_jax(cfg))
    if name == "packed":
        return make_rmsprop_jax(cfg, packed=True)
    return make_rmsprop_jax(cfg)  # default, one_leaf


def count_kernels(hlo: str) -> int:
    """Ops of the entry computation that run as kernels (fusions, copies, concatenates, gathers, ...)."""
    entry = hlo.split("ENTRY", 1)[-1].split("\n}\n", 1)[0]
    n = 0
    for line in entry.splitlines()[1:]:
        m = re.search(r" = .*?\b([a-z][a-z0-9\-]*)\(", line)
        if m and m.group(1) not in _NOT_KERNELS:
            n += 1
    return n


class StepCase:
    """One optimizer on one tree: the dispatched donated step and the K-step jitted loop."""

    def __init__(self, opt: Any, params: Any, grads: Any, k_loop: int | None) -> None:
        def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        def loop(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
            def body(i: Any, carry: Any) -> Any:
                c = 1.0 + i.astype(jnp.float32) * 1e-7  # no loop-invariant gradient work
                return step(*carry, jax.tree.map(lambda x: x * c.astype(x.dtype), g))

            return jax.lax.fori_loop(0, k_loop, body, (p, s))

        self.params = jax.tree.map(jnp.copy, params)
        self.state = opt.init(self.params)
        self.grads = grads
        self.arrays_in = len(jax.tree.leaves((self.params, self.state, grads)))
        t0 = time.perf_counter()
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(self.params, self.state, grads)
        t1 = time.perf_counter()
        self.step = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.lower_s = t1 - t0
        self.kernels = count_kernels(self.step.as_text() or "")
        self.k_loop = k_loop
        self.loop_compile_s = None
        if k_loop:
            t0 = time.perf_counter()
            self.loop = jax.jit(loop, donate_argnums=(0, 1)).lower(self.params, self.state, grads).compile()
            self.loop_compile_s = time.perf_counter() - t0

    def dispatched(self) -> float:
        t0 = time.perf_counter()
        self.params, self.state = self.step(self.params, self.state, self.grads)
        jax.block_until_ready(self.params)
        return time.perf_counter() - t0

    def in_loop(self) -> float:
        t0 = time.perf_counter()
        self.params, self.state = self.loop(self.params, self.state, self.grads)
        jax.block_until_ready(self.params)
        return (time.perf_counter() - t0) / self.k_loop  # type: ignore[operator]


class TorchGraphCase:
    """``torch.optim.RMSprop(foreach=True, capturable=True)``, one step captured in a CUDA graph."""

    def __init__(self, cfg: Config, params: Any, grads: Any) -> None:
        import torch

        self.torch = torch
        ps = []
        for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads), strict=True):
            t = torch.tensor(np.asarray(p), device="cuda", requires_grad=True)
            t.grad = torch.tensor(np.asarray(g), device="cuda")
            ps.append(t)
        opt = make_torch(cfg, ps, capturable=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            opt.step()

    def __call__(self) -> float:
        self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.graph.replay()
        self.torch.cuda.synchronize()
        return time.perf_counter() - t0


def measure(
    wl: Workload,
    cfg: Config,
    seed: int,
    rounds: int,
    per_round: int,
    loop_rounds: int,
    k_loop: int | None,
    torch_cuda: bool,
    impls_selected: list[str] | None = None,
) -> dict[str, Any]:
    params = make_tree(wl.shapes, seed=seed)
    grads = make_tree(wl.shapes, seed=100 + seed, scale=1e-2)
    n = wl.num_params
    cases: dict[str, StepCase] = {}
    for name in impls_selected or IMPLS:  # compiles in a fixed order; every figure below is interleaved
        if name == "one_leaf":
            flat = {"flat": jnp.ones((n,), jnp.float32)}
            cases[name] = StepCase(make_impl(name, cfg), flat, {"flat": flat["flat"] * 1e-2}, k_loop)
        else:
            cases[name] = StepCase(make_impl(name, cfg), params, grads, k_loop)
        print(
            f"    compiled {name}: {cases[name].compile_s:.1f} s "
            f"(+ loop {cases[name].loop_compile_s or 0:.1f} s)",
            flush=True,
        )

    # packed vs default: one step from the same inputs (same numbers, up to the last bit)
    p_def = cases["default"].step(
        jax.tree.map(jnp.copy, params), make_impl("default", cfg).init(params), grads
    )[0]
    p_pk = cases["packed"].step(jax.tree.map(jnp.copy, params), make_impl("packed", cfg).init(params), grads)[
        0
    ]
    diff, bitwise = compare_trees(p_def, p_pk)
    del p_def, p_pk

    timers: dict[str, Callable[[], float]] = {k: c.dispatched for k, c in cases.items()}
    if torch_cuda:
        timers["torch_foreach"] = TorchCase(cfg, params, grads, "cuda")
        timers["torch_foreach_graph"] = TorchGraphCase(cfg, params, grads)
    disp = interleave(timers, rounds, per_round)
    loop = interleave({k: c.in_loop for k, c in cases.items()}, loop_rounds, 1, warmup=1) if k_loop else {}

    impls: dict[str, Any] = {}
    for name in timers:
        st: dict[str, Any] = {"dispatched": stats(disp[name])}
        if name in cases:
            c = cases[name]
            st |= {
                "in_loop": stats(loop[name]) if loop else None,
                "compile_s": c.compile_s,
                "lower_s": c.lower_s,
                "loop_compile_s": c.loop_compile_s,
                "kernels": c.kernels,
                "arrays_in": c.arrays_in,
            }
        impls[name] = st

    def ratio(a: str, what: str) -> float | None:
        if a not in impls:
            return None
        x, y = impls[a], impls["optax"]
        if what == "compile":
            return x["compile_s"] / y["compile_s"]
        if x.get(what) is None or y.get(what) is None:
            return None
        return x[what]["median_ms"] / y[what]["median_ms"]

    return {
        "workload": wl.name,
        "workload_description": wl.description,
        "num_leaves": wl.num_leaves,
        "num_params": n,
        "config": cfg.name,
        "k_loop": k_loop,
        "impls": impls,
        "vs_optax": {
            a: {w: ratio(a, w) for w in ("dispatched", "in_loop", "compile")}
            for a in ("default", "packed", "optax.flatten", "one_leaf")
        },
        "packed_vs_default": {"bit_identical": bitwise, "max_abs_diff_params": diff},
    }


def run_section(
    names: set[str] | None,
    quick: bool,
    budget_s: float | None,
    torch_cuda: bool,
    loop: bool = True,
    on_group: Callable[[dict[str, Any]], None] | None = None,
    impls: list[str] | None = None,
) -> dict[str, Any]:
    """Measure every (tree, config) group; ``on_group`` gets the section so far after each one
    (so that a run stopped by a time limit keeps what it measured)."""
    t_start = time.perf_counter()
    rounds, per_round, loop_rounds = (2, 2, 2) if quick else (5, 2, 3)
    groups: list[dict[str, Any]] = []
    skipped: list[str] = []

    def section() -> dict[str, Any]:
        return {
            "settings": {
                "rounds": rounds,
                "steps_per_round": per_round,
                "loop_rounds": loop_rounds,
                "budget_s": budget_s,
            },
            "groups": groups,
            "skipped": skipped,
            "wall_s": time.perf_counter() - t_start,
        }

    for i, wl in enumerate(manyleaf_workloads(quick, names or set())):
        # 2000 x 4k: the loop programs compile for minutes on XLA:CPU; dispatched + compile only there
        k_loop = 5 if quick else (None if wl.num_leaves >= 1000 and wl.num_params > 4_000_000 else 20)
        if k_loop and not quick and wl.num_params > 4_000_000:
            k_loop = 3  # big trees: a step is tens of ms, a few per loop suffice
        if not loop:
            k_loop = None
        for cfg in CONFIGS:
            if names and {c.name for c in CONFIGS} & names and cfg.name not in names:
                continue  # --only manyleaf,<tree>,<config>
            if budget_s is not None and time.perf_counter() - t_start > budget_s:
                skipped.append(f"{wl.name}/{cfg.name}")
                continue
            print(f"  many-leaf: {wl.description}, {cfg.name}", flush=True)
            g = measure(wl, cfg, i, rounds, per_round, loop_rounds, k_loop, torch_cuda, impls)
            r = g["vs_optax"]
            print(
                "    vs optax: "
                + ", ".join(
                    f"{a} dispatched {_f(r[a]['dispatched'])} in-loop {_f(r[a]['in_loop'])} "
                    f"compile {_f(r[a]['compile'])}"
                    for a in ("default", "packed")
                ),
                flush=True,
            )
            groups.append(g)
            if on_group is not None:
                on_group(section())
    return section()


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


# --------------------------------------------------------------------------- report


def _ms(st: dict[str, Any] | None) -> str:
    return "–" if not st else f"{st['median_ms']:.3g}"


def markdown(data: dict[str, Any]) -> str:
    sec = data["manyleaf"]
    machine = machine_line(data["machine"])
    extra = [
        k for k in ("torch_foreach", "torch_foreach_graph") if any(k in g["impls"] for g in sec["groups"])
    ]
    head = IMPLS + extra
    lines = [
        f"Many-leaf section. {machine}. {sec['settings']['rounds']} interleaved rounds x "
        f"{sec['settings']['steps_per_round']} dispatched steps, "
        f"{sec['settings']['loop_rounds']} rounds of one "
        f"K-step jitted loop; {data.get('timestamp_utc', '')}; {sec['wall_s']:.0f} s."
        + (f" Skipped (budget): {', '.join(sec['skipped'])}." if sec["skipped"] else ""),
        "",
        "ms per step, median: **dispatched** (one donated jitted step per call) / **in loop** (K steps in "
        "one jitted fori_loop); compile s (lower + compile); kernels in the compiled step; arrays crossing "
        "the jit.",
        "",
        "| tree | config | measure | " + " | ".join(head) + " |",
        "|---|---|---|" + "---|" * len(head),
    ]
    for g in sec["groups"]:
        im = g["impls"]
        rows = {
            "dispatched ms": [_ms(im[k]["dispatched"]) if k in im else "–" for k in head],
            f"in loop ms (K={g['k_loop']})": [_ms(im[k].get("in_loop")) if k in im else "–" for k in head],
            "compile s": [
                f"{im[k]['compile_s']:.2f}" if k in im and "compile_s" in im[k] else "–" for k in head
            ],
            "kernels / arrays in": [
                f"{im[k]['kernels']} / {im[k]['arrays_in']}" if k in im and "kernels" in im[k] else "–"
                for k in head
            ],
        }
        for j, (what, cells) in enumerate(rows.items()):
            lead = f"| {g['workload_description']} | {g['config']} |" if j == 0 else "| | |"
            lines.append(f"{lead} {what} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**Ratios against optax** (same process; < 1: faster than optax). Goals on 1500-2000 small leaves: "
        "in loop <= 0.5, compile <= 0.5, dispatched <= 0.7.",
        "",
        "| tree | config | layout | dispatched | in loop | compile | packed == default |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in sec["groups"]:
        for a in ("default", "packed", "optax.flatten", "one_leaf"):
            r = g["vs_optax"][a]
            same = ""
            if a == "packed":
                pv = g["packed_vs_default"]
                same = "bit-identical" if pv["bit_identical"] else f"max diff {pv['max_abs_diff_params']:.1e}"
            lines.append(
                f"| {g['workload_description']} | {g['config']} | {a} | {_f(r['dispatched'])} | "
                f"{_f(r['in_loop'])} | {_f(r['compile'])} | {same} |"
            )
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = data["manyleaf"]["groups"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.45 * len(groups) + 2.5), sharey=True)
    labels = [f"{g['workload_description']}\n{g['config']}" for g in groups]
    y = np.arange(len(groups))
    for ax, what in zip(axes, ("dispatched", "in_loop", "compile"), strict=True):
        for j, a in enumerate(("default", "packed", "optax.flatten", "one_leaf")):
            vals = [g["vs_optax"][a][what] or np.nan for g in groups]
            ax.barh(y + (j - 1.5) * 0.2, vals, height=0.2, label=a)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{what.replace('_', ' ')}: time / optax's")
    axes[0].set_yticks(y, labels, fontsize=7)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
