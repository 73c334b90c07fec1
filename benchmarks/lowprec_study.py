"""Issue 12's study: which default keeps bfloat16/float16 accumulators from stalling?

    python -m benchmarks.lowprec_study            # full: 5000 steps, ~1-2 minutes on 2 cores
    python -m benchmarks.lowprec_study --quick    # 600 steps, small leaves (seconds)

Parameters in bfloat16 (and float16), one leaf of ``--size`` elements, a gradient
that is either the constant 1.0 or N(0, 1) drawn afresh every step, ``--steps``
steps at decay 0.9 / 0.99 / 0.999, lr 1e-3, eps 1e-8. Each scheme runs in one
``lax.scan`` side by side with the **float32 reference** (float32 parameters and
accumulators, fed the same low-precision gradient upcast to float32), and the
ratios are taken element by element at every step:

* ``nu``: mean over elements of the scheme's decoded nu divided by the
  reference's mean (the stall is a bias of this mean), and the RMS over elements of
  ``nu_s / nu_ref - 1`` (per-element noise; stochastic rounding adds some, round
  to nearest adds bias);
* ``step``: the mean over elements of ``u_s / u_ref`` (same gradient, so this
  is ``sqrt(nu_ref / nu_s)`` up to the rounding of ``u`` to the gradient's dtype),
  and its RMS deviation from 1.

Figures are averaged over the last 100 steps of the window (the stalled state
is a steady state; the average only smooths the noisy-gradient runs), at the
issue's 3000 steps and at the end of the run.

Schemes (rows of the table):

* ``rtn_optax``: ``optax.rmsprop`` on low-precision params: accumulators in the
  param dtype, every operation rounded to nearest (what optax users get).
* ``rtn_optout``: ``rmsprop_jax.rmsprop(..., stochastic_rounding=False)``, the
  opt-out that restores optax's round-to-nearest numbers (before issue 12, without
  that keyword: the package's default, rounding nu once per step from float32).
* ``sr``: ``rmsprop_jax.rmsprop(..., stochastic_rounding=True)``: the package's
  stochastic rounding (skipped when the installed package does not have it).
* ``f32_acc``: ``rmsprop_jax.rmsprop(..., accumulator_dtype=jnp.float32)``:
  float32 accumulators for low-precision params (2 extra bytes per param).
* ``kahan``: a prototype (here, not in the package): nu kept as an unevaluated
  sum ``hi + lo`` of two low-precision buffers, ``lo`` holding what rounding
  ``hi`` lost (Kahan-style compensation; ~16 significant bits in bfloat16).
  Decoded to float32, stepped by the package's ``rms_leaf``, re-encoded.

Also per scheme: state bytes per parameter, and the cost of one donated jitted
step (``update`` + ``apply_updates``) on a ``--cost-size`` leaf as a ratio to the
``rtn_optax`` step, all schemes interleaved in one process.

Outputs ``lowprec_study.json``, ``.md`` and ``.png`` in ``--out``
(default ``benchmarks/results/<machine-tag>/``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as a file: `benchmarks` (which adds src/) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarks  # noqa: F401
import rmsprop_jax
from benchmarks.run import JaxCase, _stats, interleave, machine_info, machine_tag
from rmsprop_jax._update import Flags, Scalars, rms_leaf

ROOT = Path(__file__).resolve().parents[1]
LR, EPS = 1e-3, 1e-8
DECAYS = (0.9, 0.99, 0.999)
PARAM_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
TAIL = 100  # steps averaged at the end of each window


def has_stochastic_rounding() -> bool:
    return "stochastic_rounding" in inspect.signature(rmsprop_jax.rmsprop).parameters


# --------------------------------------------------------------------------- the Kahan prototype


class CompensatedState(NamedTuple):
    """nu = hi + lo, both in the parameter's (low-precision) dtype."""

    nu_hi: Any
    nu_lo: Any


def compensated_rmsprop(learning_rate: float, decay: float, eps: float = EPS) -> optax.GradientTransformation:
    """Plain RMSProp whose nu is stored as two low-precision buffers ``hi + lo``.

    Decode ``nu = f32(hi) + f32(lo)``; ``rms_leaf`` (the package's equations) in
    float32; encode ``hi = round(nu)``, ``lo = round(nu - f32(hi))``. What rounding
    ``hi`` loses is carried in ``lo`` (Kahan's compensation term), so an
    increment is lost only below ~2^-16 of nu in bfloat16 instead of 2^-8.
    """
    flags = Flags()
    scalars = Scalars(
        lr=learning_rate,
        decay=decay,
        one_minus_decay=1 - decay,
        eps=eps,
        momentum=None,
        coupled_wd=None,
        decoupled_wd=None,
        bias_correction=None,
    )

    def init(params: Any) -> CompensatedState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return CompensatedState(zeros, jax.tree.map(jnp.zeros_like, params))

    def leaf(g: Any, hi: Any, lo: Any) -> tuple[Any, Any, Any]:
        nu = hi.astype(jnp.float32) + lo.astype(jnp.float32)
        u, new_nu, _, _ = rms_leaf(flags, scalars, g, None, nu, None, None)
        new_hi = new_nu.astype(hi.dtype)
        new_lo = (new_nu - new_hi.astype(jnp.float32)).astype(lo.dtype)
        return u, new_hi, new_lo

    def update(grads: Any, state: CompensatedState, params: Any = None) -> tuple[Any, CompensatedState]:
        del params
        out = jax.tree.map(leaf, grads, state.nu_hi, state.nu_lo)
        is_out = lambda x: isinstance(x, tuple)
        pick = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=is_out)
        return pick(0), CompensatedState(pick(1), pick(2))

    return optax.GradientTransformation(init, update)  # type: ignore[arg-type]


def _compensated_nu(state: CompensatedState) -> Any:
    decode = lambda h, lo: h.astype(jnp.float32) + lo.astype(jnp.float32)
    return jax.tree.map(decode, state.nu_hi, state.nu_lo)


# --------------------------------------------------------------------------- schemes


class Scheme(NamedTuple):
    name: str
    description: str
    make: Callable[[float], optax.GradientTransformation]  # decay -> transformation
    nu_of: Callable[[Any], Any]  # state -> nu tree (decoded, any float dtype)


def find_nu(state: Any) -> Any:
    """The first ``.nu`` field in a (possibly chained) optimizer state."""
    if hasattr(state, "nu"):
        return state.nu
    if isinstance(state, tuple):
        for s in state:
            try:
                return find_nu(s)
            except LookupError:
                continue
    raise LookupError(f"no nu in {type(state).__name__}")


def schemes() -> list[Scheme]:
    sr = has_stochastic_rounding()
    rtn_kw: dict[str, Any] = {"stochastic_rounding": False} if sr else {}
    out = [
        Scheme(
            "rtn_optax",
            "optax.rmsprop: low-precision accumulators, each op rounded to nearest",
            lambda d: optax.rmsprop(LR, d, EPS),
            find_nu,
        ),
        Scheme(
            "rtn_optout",
            "rmsprop_jax, stochastic_rounding=False (optax's round to nearest)"
            if sr
            else "rmsprop_jax default before issue 12: nu rounded to nearest once per step",
            lambda d: rmsprop_jax.rmsprop(LR, d, EPS, **rtn_kw),
            find_nu,
        ),
    ]
    if sr:
        out.append(
            Scheme(
                "sr",
                "rmsprop_jax, stochastic_rounding=True",
                lambda d: rmsprop_jax.rmsprop(LR, d, EPS, stochastic_rounding=True),
                find_nu,
            )
        )
    out += [
        Scheme(
            "f32_acc",
            "rmsprop_jax, accumulator_dtype=float32 (low-precision params)",
            lambda d: rmsprop_jax.rmsprop(LR, d, EPS, accumulator_dtype=jnp.float32),
            find_nu,
        ),
        Scheme(
            "kahan",
            "prototype: nu = hi + lo, two low-precision buffers (compensated)",
            lambda d: compensated_rmsprop(LR, d, EPS),
            _compensated_nu,
        ),
    ]
    return out


# --------------------------------------------------------------------------- accuracy


def run_accuracy(
    scheme: Scheme, decay: float, pdtype: Any, gradient: str, size: int, steps: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per-step statistics of ``scheme`` against the float32 reference, one scan."""
    opt = scheme.make(decay)
    ref = rmsprop_jax.rmsprop(LR, decay, EPS)
    key = jax.random.key(seed)

    def grad(t: Any) -> Any:
        if gradient == "constant":
            return jnp.ones((size,), pdtype)
        return jax.random.normal(jax.random.fold_in(key, t), (size,), jnp.float32).astype(pdtype)

    def body(carry: Any, t: Any) -> tuple[Any, dict[str, Any]]:
        p, s, p_ref, s_ref = carry
        g = grad(t)
        u, s = opt.update(g, s, p)
        u_ref, s_ref = ref.update(g.astype(jnp.float32), s_ref, p_ref)
        p, p_ref = optax.apply_updates(p, u), optax.apply_updates(p_ref, u_ref)
        nu = scheme.nu_of(s).astype(jnp.float32)
        nu_ref = s_ref.nu
        safe = jnp.where(u_ref != 0, u_ref, 1.0)
        r_step = jnp.where(u_ref != 0, u.astype(jnp.float32) / safe, 1.0)
        r_nu = nu / jnp.maximum(nu_ref, jnp.finfo(jnp.float32).tiny)
        stats = {
            "nu_mean": jnp.mean(nu),
            "nu_ref_mean": jnp.mean(nu_ref),
            "nu_rms_dev": jnp.sqrt(jnp.mean((r_nu - 1) ** 2)),
            "step_ratio_mean": jnp.mean(r_step),
            "step_rms_dev": jnp.sqrt(jnp.mean((r_step - 1) ** 2)),
            "step_over_lr": jnp.mean(jnp.abs(u.astype(jnp.float32))) / LR,
        }
        return (p, s, p_ref, s_ref), stats

    p0 = jnp.zeros((size,), pdtype)
    p0_ref = jnp.zeros((size,), jnp.float32)
    carry = (p0, opt.init(p0), p0_ref, ref.init(p0_ref))
    _, stats = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(steps)))(carry)
    return {k: np.asarray(v, np.float64) for k, v in stats.items()}


def summarize(trace: dict[str, np.ndarray], at: int) -> dict[str, float]:
    sl = slice(max(at - TAIL, 0), at)
    nu_mean = float(trace["nu_mean"][sl].mean())
    nu_ref = float(trace["nu_ref_mean"][sl].mean())
    return {
        "steps": at,
        "nu_mean": nu_mean,
        "nu_ref_mean": nu_ref,
        "nu_mean_rel_err": nu_mean / nu_ref - 1,
        "nu_rms_dev": float(trace["nu_rms_dev"][sl].mean()),
        "step_ratio_mean": float(trace["step_ratio_mean"][sl].mean()),
        "step_mean_rel_err": float(trace["step_ratio_mean"][sl].mean()) - 1,
        "step_rms_dev": float(trace["step_rms_dev"][sl].mean()),
        "step_over_lr": float(trace["step_over_lr"][sl].mean()),
    }


# --------------------------------------------------------------------------- memory and cost


def measure_cost(
    all_schemes: list[Scheme], pdtype: Any, size: int, rounds: int, per_round: int
) -> dict[str, dict[str, Any]]:
    """Donated jitted step per scheme, interleaved; state bytes per param."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal(size, dtype=np.float32)).astype(pdtype)}
    grads = {"w": jnp.asarray(1e-2 * rng.standard_normal(size, dtype=np.float32)).astype(pdtype)}
    cases = {s.name: JaxCase(s.make(0.99), params, grads, donate=True) for s in all_schemes}
    times = interleave(cases, rounds, per_round)
    base = float(np.median(times["rtn_optax"]))
    out = {}
    for s in all_schemes:
        st = _stats(times[s.name])
        st["ratio_to_rtn_optax"] = st["median_ms"] / (base * 1e3)
        st["state_bytes_per_param"] = cases[s.name].state_bytes_per_param
        out[s.name] = st
    return out


# --------------------------------------------------------------------------- outputs


def _pct(x: float) -> str:
    return f"{100 * x:+.2f} %"


def _window(data: dict[str, Any], pname: str, gradient: str, decay: float, scheme: str) -> dict[str, Any]:
    """The last window (end of the run) of one accuracy row."""
    for r in data["accuracy"]:
        if (r["param_dtype"], r["gradient"], r["decay"], r["scheme"]) == (pname, gradient, decay, scheme):
            return dict(r["windows"][-1])
    raise KeyError((pname, gradient, decay, scheme))


def summary_table(data: dict[str, Any]) -> list[str]:
    """One row per scheme and param dtype: the figures the choice of default rests on."""
    steps = data["settings"]["steps"]
    lines = [
        f"## Summary (after {steps} steps; errors relative to float32 params and accumulators)",
        "",
        "| params | scheme | state B/param | step err, g = 1, decay 0.9 / 0.99 / 0.999 "
        "| nu err, noisy g, 0.9 / 0.99 / 0.999 | nu per-element RMS, noisy, 0.999 | step cost / rtn_optax |",
        "|---|---|---|---|---|---|---|",
    ]
    for pname in data["param_dtypes"]:
        for scheme in data["schemes"]:
            c = data["cost"][pname][scheme]
            step = " / ".join(
                f"{100 * _window(data, pname, 'constant', d, scheme)['step_mean_rel_err']:+.2f}"
                for d in DECAYS
            )
            nu = " / ".join(
                f"{100 * _window(data, pname, 'noisy', d, scheme)['nu_mean_rel_err']:+.2f}" for d in DECAYS
            )
            rms = 100 * _window(data, pname, "noisy", DECAYS[-1], scheme)["nu_rms_dev"]
            lines.append(
                f"| {pname} | {scheme} | {c['state_bytes_per_param']:.0f} | {step} % | {nu} % | {rms:.2f} % "
                f"| {c['ratio_to_rtn_optax']:.2f} |"
            )
    return [*lines, ""]


def to_markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        "# bfloat16 / float16 accumulators: round to nearest, stochastic rounding, float32, compensated",
        "",
        f"`python -m benchmarks.lowprec_study{' --quick' if data['quick'] else ''}`, "
        f"{data['timestamp_utc']}, "
        f"{m['cpu_model']} ({m['cpu_cores']} cores, {m['platform']}), jax {m['jax']}, optax {m['optax']}. "
        f"One leaf of {data['settings']['size']} elements, lr {LR}, eps {EPS}; figures are means over the "
        f"last {TAIL} steps of each window, against float32 params and accumulators fed the same gradients.",
        "",
        "Schemes: " + "; ".join(f"**{k}**: {v}" for k, v in data["schemes"].items()) + ".",
        "",
    ]
    lines += summary_table(data)
    for pname in data["param_dtypes"]:
        for gradient in data["gradients"]:
            lines += [
                f"## {pname} params, {gradient} gradient",
                "",
                "| decay | steps | float32 nu | scheme | nu mean err | nu per-elem RMS | step mean err "
                "| step per-elem RMS |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in data["accuracy"]:
                if r["param_dtype"] != pname or r["gradient"] != gradient:
                    continue
                for s in r["windows"]:
                    lines.append(
                        f"| {r['decay']} | {s['steps']} | {s['nu_ref_mean']:.4f} | {r['scheme']} "
                        f"| {_pct(s['nu_mean_rel_err'])} | {100 * s['nu_rms_dev']:.2f} % "
                        f"| {_pct(s['step_mean_rel_err'])} | {100 * s['step_rms_dev']:.2f} % |"
                    )
            lines.append("")
    lines += [
        f"## Memory and step cost ({data['settings']['cost_size']} elements, donated jitted step, "
        f"decay 0.99, {data['settings']['rounds']} interleaved rounds x {data['settings']['per_round']})",
        "",
        "| params | scheme | state bytes/param | step median ms (p25-p75) | ratio to rtn_optax |",
        "|---|---|---|---|---|",
    ]
    for pname, costs in data["cost"].items():
        for name, c in costs.items():
            lines.append(
                f"| {pname} | {name} | {c['state_bytes_per_param']:.2f} | {c['median_ms']:.3f} "
                f"({c['p25_ms']:.3f}-{c['p75_ms']:.3f}) | {c['ratio_to_rtn_optax']:.2f} |"
            )
    lines += ["", f"Load average (1 min) before/after: {data['loadavg']}.", ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], traces: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("constant", d) for d in DECAYS] + [("noisy", DECAYS[-1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (gradient, decay) in zip(axes[0], panels, strict=True):
        for name in data["schemes"]:
            key = ("bfloat16", gradient, decay, name)
            if key not in traces:
                continue
            tr = traces[key]
            ax.plot(tr["nu_mean"], label=name)
        ref = traces.get(("bfloat16", gradient, decay, "rtn_optax"))
        if ref is not None:
            ax.plot(ref["nu_ref_mean"], "k--", lw=1, label="float32")
        g_text = "g = 1" if gradient == "constant" else "g ~ N(0, 1)"
        ax.set_title(f"bfloat16 params, {g_text}, decay {decay}")
        ax.set_xlabel("step")
        ax.set_ylabel("mean nu")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.lowprec_study", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="600 steps, small leaves (seconds)")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 5000; quick 600)")
    ap.add_argument("--size", type=int, default=None, help="leaf size for accuracy (default 4096)")
    ap.add_argument("--cost-size", type=int, default=None, help="leaf size for the step cost (default 4M)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import os

    info = machine_info()
    out = args.out or ROOT / "benchmarks" / "results" / (machine_tag(info) + ("-quick" if args.quick else ""))
    steps = args.steps or (600 if args.quick else 5000)
    size = args.size or (512 if args.quick else 4096)
    cost_size = args.cost_size or ((1 << 16) if args.quick else (1 << 22))
    rounds, per_round = (3, 2) if args.quick else (10, 5)
    windows = sorted({min(3000, steps), steps})
    load = [round(os.getloadavg()[0], 2)]
    t0 = time.perf_counter()

    all_schemes = schemes()
    accuracy, traces = [], {}
    for pname, pdtype in PARAM_DTYPES.items():
        for gradient in ("constant", "noisy"):
            for decay in DECAYS:
                for s in all_schemes:
                    tr = run_accuracy(s, decay, pdtype, gradient, size, steps)
                    traces[(pname, gradient, decay, s.name)] = tr
                    wins = [summarize(tr, w) for w in windows]
                    accuracy.append(
                        {"param_dtype": pname, "gradient": gradient, "decay": decay, "scheme": s.name}
                        | {"windows": wins}
                    )
                    last = wins[-1]
                    print(
                        f"{pname:8s} {gradient:8s} decay {decay:<5} {s.name:9s} nu {last['nu_mean']:.4f} "
                        f"(f32 {last['nu_ref_mean']:.4f}, {_pct(last['nu_mean_rel_err'])}), "
                        f"step {_pct(last['step_mean_rel_err'])}",
                        flush=True,
                    )
    cost = {}
    for pname, pdtype in PARAM_DTYPES.items():
        cost[pname] = measure_cost(all_schemes, pdtype, cost_size, rounds, per_round)
        for name, c in cost[pname].items():
            print(
                f"cost {pname} {name:9s} {c['median_ms']:.3f} ms x{c['ratio_to_rtn_optax']:.2f}, "
                f"{c['state_bytes_per_param']:.2f} B/param",
                flush=True,
            )
    load.append(round(os.getloadavg()[0], 2))
    data = {
        "timestamp_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "quick": args.quick,
        "machine": info,
        "settings": {
            "steps": steps,
            "size": size,
            "cost_size": cost_size,
            "rounds": rounds,
            "per_round": per_round,
            "lr": LR,
            "eps": EPS,
            "tail_steps_averaged": TAIL,
        },
        "param_dtypes": list(PARAM_DTYPES),
        "gradients": ["constant", "noisy"],
        "schemes": {s.name: s.description for s in all_schemes},
        "accuracy": accuracy,
        "cost": cost,
        "loadavg": load,
        "wall_s": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "lowprec_study.json").write_text(json.dumps(data, indent=1))
    (out / "lowprec_study.md").write_text(to_markdown(data))
    plot(data, traces, out / "lowprec_study.png")
    print(f"wrote {out}/lowprec_study.json, .md, .png in {data['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
