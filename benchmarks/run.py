"""The benchmark suite: rmsprop_jax vs optax vs PyTorch, one process, interleaved.

Run from the repository root::

    python -m benchmarks.run            # full run (a few minutes on 2 CPU cores)
    python -m benchmarks.run --quick    # < 1 minute, small sizes (what the test runs)
    python benchmarks/run.py --quick    # the same, as a script
    python -m benchmarks.run --only manyleaf [--budget 240]   # only the many-leaf section

Results land in ``benchmarks/results/<machine-tag>/`` (``--out`` to change):
``results.json`` (everything measured), ``results.md`` (the tables) and
``results.png`` (the plot); the many-leaf section (``benchmarks/manyleaf.py``) writes
``manyleaf.json``, ``manyleaf.md`` and ``manyleaf.png`` beside them. ``--render
results.json`` (or ``manyleaf.json``) rebuilds the Markdown and the plot from an
existing JSON without measuring.

What one "step" is: ``updates, state = opt.update(grads, state, params);
params = optax.apply_updates(params, updates)`` in one ``jax.jit``, with
``params`` and ``state`` donated or not; PyTorch's is ``optimizer.step()`` with
``foreach=True`` (always in place). Within a (workload, config) group every
implementation, the bandwidth triads and the one-leaf reference run in
interleaved rounds, so machine drift hits every side alike. See
``benchmarks/README.md`` for the definitions of every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: `benchmarks` (which adds src/) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarks  # noqa: F401
from benchmarks import manyleaf, report
from benchmarks.workloads import (
    CONFIGS,
    Config,
    Workload,
    make_optax,
    make_rmsprop_jax,
    make_torch,
    workloads,
)

ROOT = Path(__file__).resolve().parents[1]
Timer = Callable[[], float]


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    info: dict[str, Any] = {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    torch = _torch()
    info["torch"] = torch.__version__ if torch is not None else None
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


def machine_tag(info: dict[str, Any]) -> str:
    if info["platform"] == "cpu":
        return f"cpu-{info['cpu_cores']}core"
    kind = "".join(c if c.isalnum() else "-" for c in info["device_kind"].lower()).strip("-")
    return f"{info['platform']}-{kind}"


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------------- cases


def make_tree(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 1.0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(scale * rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}


def _copy_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _nbytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


class JaxCase:
    """One jitted optimizer step (update + apply_updates), compiled ahead of time."""

    def __init__(self, opt: Any, params: Any, grads: Any, donate: bool, fused_apply: bool = False) -> None:
        def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
            if fused_apply:  # rmsprop_jax.update_and_apply: the parameter updated inside the step
                import rmsprop_jax

                return rmsprop_jax.update_and_apply(opt, g, s, p)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s

        self.params = _copy_tree(params)
        self.state = opt.init(self.params)
        self.grads = grads
        num_params = sum(x.size for x in jax.tree.leaves(params))
        self.state_bytes_per_param = _nbytes(self.state) / num_params
        t0 = time.perf_counter()
        lowered = jax.jit(step, donate_argnums=(0, 1) if donate else ()).lower(self.params, self.state, grads)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        self.lower_s, self.compile_s = t1 - t0, t2 - t1
        mem = self.compiled.memory_analysis()
        self.temp_bytes = None if mem is None else int(mem.temp_size_in_bytes)

    def one_step(self, params: Any, state: Any) -> Any:
        """A step from the given inputs (for the numerics check; only on a non-donated case)."""
        return self.compiled(params, state, self.grads)

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.params, self.state = self.compiled(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))
        return time.perf_counter() - t0


class TriadCase:
    """Donated ``x <- x + 0.5 * y``: 12 bytes per float32 element, the bandwidth yardstick."""

    def __init__(self, x: Any, y: Any) -> None:
        self.x, self.y = _copy_tree(x), y
        fn = lambda a, b: jax.tree.map(lambda u, v: u + 0.5 * v, a, b)
        self.compiled = jax.jit(fn, donate_argnums=0).lower(self.x, y).compile()

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.x = self.compiled(self.x, self.y)
        jax.block_until_ready(self.x)
        return time.perf_counter() - t0


class TorchCase:
    def __init__(self, cfg: Config, params: Any, grads: Any, device: str) -> None:
        import torch

        self.torch, self.device = torch, device
        self.params = []
        for p, g in zip(jax.tree.leaves(params), jax.tree.leaves(grads), strict=True):
            t = torch.tensor(np.asarray(p), device=device, requires_grad=True)
            t.grad = torch.tensor(np.asarray(g), device=device)
            self.params.append(t)
        self.opt = make_torch(cfg, self.params)
        self.state_bytes_per_param = None

    def __call__(self) -> float:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.opt.step()
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return time.perf_counter() - t0


def _torch_device() -> str | None:
    torch = _torch()
    if torch is None:
        return None
    platform_ = jax.devices()[0].platform
    if platform_ == "cpu":
        return "cpu"
    if platform_ == "gpu" and torch.cuda.is_available():
        return "cuda"
    return None  # comparing a GPU JAX step with a CPU torch step would mean nothing


def interleave(
    cases: Mapping[str, Timer], rounds: int, per_round: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Run every case ``warmup`` times, then ``rounds`` rounds of ``per_round`` steps each,
    rotating the order each round so that no case always runs first."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            for _ in range(per_round):
                times[name].append(cases[name]())
    return times


def _stats(ts: list[float]) -> dict[str, Any]:
    a = np.asarray(ts) * 1e3
    return {
        "median_ms": float(np.median(a)),
        "p25_ms": float(np.percentile(a, 25)),
        "p75_ms": float(np.percentile(a, 75)),
        "min_ms": float(a.min()),
        "n": len(ts),
    }


def compare_trees(a: Any, b: Any) -> tuple[float, bool]:
    """(largest |a - b| over all leaves, whether every leaf is bit-identical)."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    diff = max((float(jnp.max(jnp.abs(x - y), initial=0.0)) for x, y in pairs), default=0.0)
    return diff, all(bool(jnp.array_equal(x, y)) for x, y in pairs)


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
    load_before = _loadavg()
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
    load_after = _loadavg()

    stream_bytes = cfg.stream_count() * 4 * n  # float32
    triad_flat = _stats(times["triad/flat"])
    triad_tree = _stats(times["triad/tree"])
    bw_flat = 12 * n / (triad_flat["median_ms"] * 1e-3)
    bound_ms = stream_bytes / bw_flat * 1e3
    impls: dict[str, Any] = {}
    for name, case in cases.items():
        if name.startswith("triad/"):
            continue
        st = _stats(times[name])
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
            self.fn, self.p = fn, _copy_tree(params)
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
    out = {k: {"description": variants[k][0]} | _stats(times[k]) for k in variants}
    base = out["one_jit_donated"]["median_ms"]
    for v in out.values():
        v["vs_one_jit_donated"] = v["median_ms"] / base
    return {
        "model": f"MLP {dims}, batch {batch}",
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "variants": out,
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (< 1 minute)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default results/<machine-tag>)")
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated workload names to run; 'manyleaf' for the many-leaf section",
    )
    ap.add_argument(
        "--impls",
        default=None,
        help="many-leaf section: comma-separated subset of default,packed,optax,optax.flatten,one_leaf "
        "(optax is always needed for the ratios)",
    )
    ap.add_argument(
        "--no-loop", action="store_true", help="many-leaf section: skip the in-loop (fori_loop) programs"
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="many-leaf section: start no new group after this many seconds",
    )
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch even if it is installed")
    ap.add_argument("--no-training-step", action="store_true", help="skip the jit/donation MLP section")
    ap.add_argument("--render", type=Path, default=None, help="only rebuild .md/.png from this JSON")
    args = ap.parse_args(argv)

    if args.render is not None:
        data = json.loads(args.render.read_text())
        if "manyleaf" in data:
            _write_manyleaf(data, args.out or args.render.parent)
        else:
            report.write_outputs(data, args.out or args.render.parent)
        return 0

    info = machine_info()
    out = args.out or ROOT / "benchmarks" / "results" / (machine_tag(info) + ("-quick" if args.quick else ""))
    rounds, per_round = (3, 2) if args.quick else (8, 3)
    torch_device = None if args.no_torch else _torch_device()
    only = None if args.only is None else args.only.split(",")
    selected = [w for w in workloads(args.quick) if only is None or w.name in only]
    print(
        f"machine: {info['cpu_model']} ({info['cpu_cores']} cores), {info['platform']} {info['device_kind']}"
    )
    t_start = time.perf_counter()
    # First compiles in a process pay one-time costs (JAX's own internal jits, caches):
    # pay them here so that the first workload's compile ratio is not skewed.
    tiny = make_tree({"w": (4, 4), "b": (4,)}, seed=0)
    for cfg in CONFIGS:
        for make in (make_rmsprop_jax, make_optax):
            for donate in (True, False):
                JaxCase(make(cfg), tiny, tiny, donate)()
    out.mkdir(parents=True, exist_ok=True)
    if only is None or "manyleaf" in only:  # --only manyleaf[,tree,...]: the many-leaf section
        print("many-leaf section", flush=True)

        def save(section: dict[str, Any]) -> dict[str, Any]:
            ml = {
                "schema": 1,
                "timestamp_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "quick": args.quick,
                "machine": info,
                "loadavg_1min_end": _loadavg(),
                "manyleaf": section,
            }
            (out / "manyleaf.json").write_text(json.dumps(ml, indent=1))
            _write_manyleaf(ml, out)
            return ml

        section = manyleaf.run_section(
            set(only or []) - {"manyleaf"},
            args.quick,
            args.budget,
            interleave,
            make_tree,
            torch_cuda=torch_device == "cuda",
            loop=not args.no_loop,
            on_group=save,
            impls=None if args.impls is None else args.impls.split(","),
        )
        save(section)
        print(
            f"wrote {out}/manyleaf.json, manyleaf.md, manyleaf.png in {section['wall_s']:.0f} s", flush=True
        )
        if only is not None and not selected:
            return 0
    groups = []
    for i, wl in enumerate(selected):
        params = make_tree(wl.shapes, seed=i)
        grads = make_tree(wl.shapes, seed=100 + i, scale=1e-2)
        for cfg in CONFIGS:
            print(f"  {wl.name} ({wl.description}), {cfg.name}", flush=True)
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
    if not args.no_training_step:
        print("  training step (jit / donation / optimizer placement)", flush=True)
        training = measure_training_step(args.quick, rounds, per_round)
    data = {
        "schema": 1,
        "timestamp_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "machine": info,
        "settings": {"rounds": rounds, "steps_per_round": per_round, "warmup_steps": 2},
        "groups": groups,
        "training_step": training,
        "wall_s": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(data, indent=1))
    report.write_outputs(data, out)
    print(f"wrote {out}/results.json, results.md, results.png in {data['wall_s']:.0f} s")
    if args.only is None or "lowmem" in args.only.split(","):  # state formats: benchmarks/lowmem.py
        from benchmarks import lowmem  # imports this module: not at the top

        lowmem.write_outputs(lowmem.run_section(args.quick), out)
        print(f"wrote {out}/lowmem.json, lowmem.md, lowmem.png")
    return 0


def _write_manyleaf(data: dict[str, Any], out: Path) -> None:
    m = data["machine"]
    machine = (
        f"{m['cpu_model']}, {m['cpu_cores']} cores; JAX device {m['platform']} ({m['device_kind']}); "
        f"jax {m['jax']}, optax {m['optax']}, torch {m.get('torch') or '-'}"
    )
    (out / "manyleaf.md").write_text(manyleaf.markdown(data, machine))
    manyleaf.plot(data, out / "manyleaf.png")


if __name__ == "__main__":
    raise SystemExit(main())
