"""DQN on MinAtar, five optimizers: ``python -m benchmarks.rl.run [--quick] [--games G ...] [--frames N]``.

Writes ``benchmarks/results/cpu-2core/rl/minatar_dqn.{json,png,md}`` (``--out`` to change). The JSON
is rewritten after every (game, optimizer), so an interrupted run keeps what finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from benchmarks.rl.dqn import DQNConfig, make_train

OUT = Path(__file__).resolve().parents[1] / "results" / "cpu-2core" / "rl"
TORCH_MINATAR = dict(lr=2.5e-4, alpha=0.95, centered=True, eps=0.01)  # MinAtar examples/dqn.py

OPTIMIZERS = {
    "rmsprop_torch_minatar": lambda: rmsprop_jax.presets.pytorch(**TORCH_MINATAR),
    "rmsprop_dqn2015": lambda: rmsprop_jax.presets.dqn_2015(),
    "adam_rainbow": lambda: optax.adam(2.5e-4, eps=3.125e-4),
    "rmsprop_torch_minatar_int8": lambda: rmsprop_jax.presets.pytorch(
        **TORCH_MINATAR, accumulator_dtype="int8"
    ),
    "rmsprop_torch_minatar_bf16": lambda: rmsprop_jax.presets.pytorch(
        **TORCH_MINATAR, accumulator_dtype=jnp.bfloat16
    ),
}

# Published figures (for context; none is at our frame count).
PUBLISHED = {
    "minatar_paper_dqn_5M_read_from_plots": {
        "source": "Young & Tian 2019, MinAtar: DQN curves at 5M frames, read approximately from the plots",
        "Breakout-MinAtar": "~6-15",
        "SpaceInvaders-MinAtar": "~20-30",
    },
    "gymnax_readme_ppo": {
        "source": "gymnax README table (PPO, gymnax's own runs)",
        "Asterix-MinAtar": 15,
        "Breakout-MinAtar": 28,
        "Freeway-MinAtar": 58,
        "SpaceInvaders-MinAtar": 131,
    },
}


def quantized_leaves(optimizer, params) -> list[str]:
    """Paths of the state leaves stored as ``rmsprop_jax.QuantizedLeaf`` (8-bit codes), with their shapes."""
    state = optimizer.init(params)
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, rmsprop_jax.QuantizedLeaf)
    )[0]:
        if isinstance(leaf, rmsprop_jax.QuantizedLeaf):
            found.append(jax.tree_util.keystr(path) + f" {tuple(leaf.codes.shape)}")
    return found


def summarize(history, cfg: DQNConfig, final_frac: float = 0.2) -> dict:
    ret_sum = np.asarray(history.return_sum, np.float64)  # (chunks, seeds)
    eps = np.asarray(history.episodes, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = ret_sum / eps  # mean return of the episodes that ended in each chunk, per seed
    n_final = max(1, math.ceil(final_frac * ret_sum.shape[0]))
    final = ret_sum[-n_final:].sum(0) / np.maximum(eps[-n_final:].sum(0), 1)
    loss = np.asarray(history.loss_sum) / np.maximum(np.asarray(history.updates), 1)
    seeds = curve.shape[1]
    mean = np.nanmean(curve, 1)
    se = np.nanstd(curve, 1, ddof=1) / np.sqrt(np.maximum(np.sum(~np.isnan(curve), 1), 1))
    return {
        "frames": [(i + 1) * cfg.log_every for i in range(curve.shape[0])],
        "return_per_seed": np.where(np.isnan(curve), None, curve).T.tolist(),
        "return_mean": mean.tolist(),
        "return_ci95": (1.96 * se).tolist(),
        "loss_mean": loss.mean(1).tolist(),
        "final_window_frames": n_final * cfg.log_every,
        "final_return_per_seed": final.tolist(),
        "final_return_mean": float(final.mean()),
        "final_return_std": float(final.std(ddof=1)) if seeds > 1 else 0.0,
        "final_return_ci95": float(1.96 * final.std(ddof=1) / np.sqrt(seeds)) if seeds > 1 else 0.0,
        "episodes_per_seed": eps.sum(0).tolist(),
    }


def run_one(game, name, cfg, seeds, seed=0) -> dict:
    opt = OPTIMIZERS[name]()
    train = jax.jit(make_train(game, opt, cfg, seeds))
    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    compiled = train.lower(key).compile()
    t1 = time.perf_counter()
    _, history = compiled(key)
    jax.block_until_ready(history)
    t2 = time.perf_counter()
    res = summarize(history, cfg)
    res.update(
        compile_s=t1 - t0,
        train_s=t2 - t1,
        s_per_100k_frames=(t2 - t1) / cfg.frames * 1e5,
    )
    return res


def time_interleaved(game: str, cfg: DQNConfig, seeds: int, rounds: int, names: list[str]) -> dict:
    """Wall time of the same learning-only run (every frame updates) per optimizer, interleaved.

    Each optimizer's train is compiled once; then ``rounds`` rounds call them in turn, so the
    machine's load drifts over all of them alike. Reported: the median over rounds in seconds per
    100k frames (all seeds together) and its ratio to the median of ``rmsprop_torch_minatar``.
    """
    cfg = dataclasses.replace(cfg, replay_start=0)
    key = jax.random.PRNGKey(0)
    compiled = {n: jax.jit(make_train(game, OPTIMIZERS[n](), cfg, seeds)).lower(key).compile() for n in names}
    for f in compiled.values():
        jax.block_until_ready(f(key))  # warm
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n, f in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(key))
            times[n].append((time.perf_counter() - t0) / cfg.frames * 1e5)
    base = float(np.median(times.get("rmsprop_torch_minatar", next(iter(times.values())))))
    return {
        "game": game,
        "frames_per_call": cfg.frames,
        "seeds": seeds,
        "rounds": rounds,
        "s_per_100k_frames_median": {n: float(np.median(t)) for n, t in times.items()},
        "s_per_100k_frames_all": times,
        "ratio_to_rmsprop_torch_minatar": {n: float(np.median(t)) / base for n, t in times.items()},
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    games = list(results["runs"])
    fig, axes = plt.subplots(1, len(games), figsize=(5.5 * len(games), 4), squeeze=False)
    for ax, game in zip(axes[0], games, strict=True):
        for name, r in results["runs"][game].items():
            x = np.array(r["frames"])
            m, c = np.array(r["return_mean"], float), np.array(r["return_ci95"], float)
            (line,) = ax.plot(x, m, label=name)
            ax.fill_between(x, m - c, m + c, color=line.get_color(), alpha=0.15)
        ax.set_title(f"{game} (DQN, {results['seeds']} seeds, mean ± 95% CI)")
        ax.set_xlabel("frames")
        ax.set_ylabel("episode return")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    pub_paper = PUBLISHED["minatar_paper_dqn_5M_read_from_plots"]
    pub_ppo = PUBLISHED["gymnax_readme_ppo"]
    lines = [
        f"DQN on MinAtar, {results['frames']:,} frames per run, {results['seeds']} vmapped seeds, "
        f"final return = mean return of the episodes that ended in the last "
        f"{results['final_window_frames']:,} frames, per seed; ± is the std over seeds. "
        f"Machine: {results['machine']}.",
        "",
        "| game | optimizer | final return (mean ± std over seeds) | 95% CI | s / 100k frames (all seeds) "
        "| compile s | MinAtar paper DQN @5M (read from plots) | gymnax PPO (README) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for game, runs in results["runs"].items():
        for name, r in runs.items():
            lines.append(
                f"| {game} | {name} | {r['final_return_mean']:.2f} ± {r['final_return_std']:.2f} "
                f"| ±{r['final_return_ci95']:.2f} | {r['s_per_100k_frames']:.0f} | {r['compile_s']:.0f} "
                f"| {pub_paper.get(game, '-')} | {pub_ppo.get(game, '-')} |"
            )
    if "timing" in results:
        t = results["timing"]
        lines += [
            "",
            f"Step cost, interleaved in one process ({t['game']}, {t['frames_per_call']:,} frames per call, "
            f"every frame an update, {t['seeds']} seeds, median of {t['rounds']} rounds):",
            "",
            "| optimizer | s / 100k frames | ratio to rmsprop_torch_minatar |",
            "|---|---|---|",
        ]
        for n, v in t["s_per_100k_frames_median"].items():
            lines.append(f"| {n} | {v:.0f} | {t['ratio_to_rmsprop_torch_minatar'][n]:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="3000 frames, 2 seeds, one game (a smoke run)")
    ap.add_argument("--games", nargs="+", default=["Breakout-MinAtar", "SpaceInvaders-MinAtar"])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--replay-start", type=int, default=None, help="default: 5000, or frames/10 if fewer")
    ap.add_argument("--log-every", type=int, default=2500)
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--timing-rounds", type=int, default=3, help="interleaved rounds of the step-cost timing")
    ap.add_argument("--timing-frames", type=int, default=5000, help="frames per timed call (all learning)")
    ap.add_argument(
        "--timing-only", action="store_true", help="only the interleaved timing, merged into an existing JSON"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.frames, args.seeds, args.games, args.log_every = 3000, 2, args.games[:1], 500
    if args.timing_only:
        path = args.out / "minatar_dqn.json"
        results = json.loads(path.read_text())
        tcfg = DQNConfig(log_every=args.timing_frames).scaled(args.timing_frames)
        t = time_interleaved(args.games[0], tcfg, args.seeds, args.timing_rounds, args.optimizers)
        results["timing"] = t
        path.write_text(json.dumps(results, indent=1))
        (args.out / "minatar_dqn.md").write_text(table(results))
        print(table(results))
        return
    cfg = DQNConfig(log_every=args.log_every).scaled(args.frames)
    replay_start = args.replay_start if args.replay_start is not None else min(5000, args.frames // 10)
    cfg = dataclasses.replace(cfg, replay_start=replay_start)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "config": dataclasses.asdict(cfg),
        "frames": cfg.frames,
        "seeds": args.seeds,
        "final_window_frames": None,
        "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores, shared with other jobs), "
        f"{jax.devices()[0].platform}, jax {jax.__version__}, rmsprop_jax {rmsprop_jax.__version__}",
        "optimizers": {
            "rmsprop_torch_minatar": "presets.pytorch(lr=2.5e-4, alpha=0.95, centered=True, eps=0.01)",
            "rmsprop_dqn2015": "presets.dqn_2015()",
            "adam_rainbow": "optax.adam(2.5e-4, eps=3.125e-4)",
            "rmsprop_torch_minatar_int8": "presets.pytorch(..., accumulator_dtype='int8')",
            "rmsprop_torch_minatar_bf16": "presets.pytorch(..., accumulator_dtype=jnp.bfloat16)",
        },
        "published": PUBLISHED,
        "runs": {},
    }
    from benchmarks.rl.dqn import QNetwork

    net_params = QNetwork(3).init(jax.random.PRNGKey(0), jnp.zeros((10, 10, 4)))
    int8 = OPTIMIZERS["rmsprop_torch_minatar_int8"]()
    results["int8_quantized_leaves"] = quantized_leaves(int8, net_params)
    for game in args.games:
        results["runs"][game] = {}
        for name in args.optimizers:
            r = run_one(game, name, cfg, args.seeds)
            results["runs"][game][name] = r
            results["final_window_frames"] = r["final_window_frames"]
            print(
                f"{game:24s} {name:28s} final {r['final_return_mean']:6.2f} ± {r['final_return_std']:5.2f}  "
                f"{r['s_per_100k_frames']:7.0f} s/100k frames  (compile {r['compile_s']:.0f} s)",
                flush=True,
            )
            (args.out / "minatar_dqn.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "minatar_dqn.png")
    (args.out / "minatar_dqn.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
