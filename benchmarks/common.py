"""What every section of the suite shares: the machine, interleaved timing, one jitted step.

Public API only: ``rmsprop_jax`` and its public names, ``optax``, ``jax``.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def torch_or_none() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


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
    import rmsprop_jax

    info["rmsprop_jax"] = getattr(rmsprop_jax, "__version__", None)
    info["rmsprop_jax_file"] = str(Path(rmsprop_jax.__file__).resolve())
    info["git_commit"] = git_commit()
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    torch = torch_or_none()
    info["torch"] = torch.__version__ if torch is not None else None
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


def git_commit() -> str | None:
    """The checkout's commit (short), '+dirty' when the package is imported from this checkout's
    src/ and src/ has uncommitted changes; None outside git. (Measuring an exported tree, e.g.
    ``git archive HEAD src`` on PYTHONPATH: ``rmsprop_jax_file`` in the machine record says so.)"""
    import subprocess

    import rmsprop_jax

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        here = (ROOT / "src") in Path(rmsprop_jax.__file__).resolve().parents
        dirty = here and bool(git("status", "--porcelain", "--", "src").strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def machine_tag(info: dict[str, Any]) -> str:
    if info["platform"] == "cpu":
        return f"cpu-{info['cpu_cores']}core"
    kind = "".join(c if c.isalnum() else "-" for c in info["device_kind"].lower()).strip("-")
    return f"{info['platform']}-{kind}"


def machine_line(m: dict[str, Any]) -> str:
    """One line naming the machine and the versions, for every Markdown output."""
    return (
        f"{m['cpu_model']}, {m['cpu_cores']} cores"
        + (f", {m['memory_gib']} GiB" if m.get("memory_gib") else "")
        + f"; JAX device {m['platform']} ({m['device_kind']}); jax {m['jax']}, optax {m['optax']}, "
        f"torch {m.get('torch') or '-'}; commit {m.get('git_commit') or '?'}"
    )


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------------- trees and timing


def make_tree(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 1.0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(scale * rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}


def copy_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def nbytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


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


def stats(ts: list[float]) -> dict[str, Any]:
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


class JaxCase:
    """One jitted optimizer step, compiled ahead of time: ``update`` + ``optax.apply_updates``,
    or ``rmsprop_jax.update_and_apply`` (``fused_apply=True``: the parameter updated inside the step)."""

    def __init__(self, opt: Any, params: Any, grads: Any, donate: bool, fused_apply: bool = False) -> None:
        def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
            if fused_apply:
                import rmsprop_jax

                return rmsprop_jax.update_and_apply(opt, g, s, p)
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s

        self.params = copy_tree(params)
        self.state = opt.init(self.params)
        self.grads = grads
        num_params = sum(x.size for x in jax.tree.leaves(params))
        self.state_bytes_per_param = nbytes(self.state) / num_params
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


class TorchCase:
    """``torch.optim.RMSprop(foreach=True).step()`` on the tree's leaves, in place."""

    def __init__(self, cfg: Any, params: Any, grads: Any, device: str) -> None:
        import torch

        from benchmarks.workloads import make_torch

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


def torch_device() -> str | None:
    """Where PyTorch runs beside JAX: its CPU beside JAX's CPU, CUDA beside a JAX GPU, else nowhere
    (a GPU JAX step against a CPU torch step would compare nothing)."""
    torch = torch_or_none()
    if torch is None:
        return None
    platform_ = jax.devices()[0].platform
    if platform_ == "cpu":
        return "cpu"
    if platform_ == "gpu" and torch.cuda.is_available():
        return "cuda"
    return None


def state_summary(state: Any, num_params: int, accumulators: int) -> dict[str, float]:
    """State bytes per parameter and the share of accumulator elements stored quantized (8-bit,
    4-bit or FP8: a ``rmsprop_jax.QuantizedLeaf``, counted by its parameter's elements).

    ``state`` may be arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape(opt.init, params)``)."""
    import rmsprop_jax

    leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype")]
    total = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)
    is_q = lambda x: isinstance(x, rmsprop_jax.QuantizedLeaf)
    # a QuantizedLeaf counts its parameter's elements; codes outside one (an NNX state holds them
    # as plain mappings) count one element per byte
    quantized = sum(
        int(np.prod(x.shape)) if is_q(x) else int(np.prod(x.shape)) * (jnp.dtype(x.dtype).itemsize == 1)
        for x in jax.tree.leaves(state, is_leaf=is_q)
        if is_q(x) or hasattr(x, "dtype")
    )
    return {
        "state_bytes": total,
        "bytes_per_param": total / num_params,
        "quantized_share": quantized / (accumulators * num_params),
    }
