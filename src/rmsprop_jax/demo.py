"""``python -m rmsprop_jax.demo``: RMSProp, Adam and SGD+momentum on a Flax NNX CNN, real data.

Trains the same small CNN (same initialisation, same minibatch order, same
number of steps) on scikit-learn's bundled 8x8 digits with
``rmsprop_jax.rmsprop``, ``optax.adam`` and ``optax.sgd`` with momentum, prints
a table of final test accuracy, test loss and seconds per epoch, and writes a
PNG of the loss curves. Needs the ``examples`` extra::

    pip install "rmsprop-jax[examples]"
    python -m rmsprop_jax.demo --epochs 20 --seed 0 --out demo_out
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Each optimizer at its customary default: the comparison is "out of the box", not tuned.
OPTIMIZERS: dict[str, tuple[str, float]] = {
    "rmsprop_jax.rmsprop": ("rmsprop", 1e-3),
    "optax.adam": ("adam", 1e-3),
    "optax.sgd (momentum 0.9)": ("sgd", 1e-2),
}


def _missing(exc: ImportError) -> SystemExit:
    return SystemExit(
        f"rmsprop_jax.demo needs the 'examples' extra ({exc.name or exc} is not installed).\n"
        'Install it with:  pip install "rmsprop-jax[examples]"'
    )


def make_tx(kind: str, lr: float) -> Any:
    """The optimizer named ``kind`` (``rmsprop``, ``adam`` or ``sgd``) at learning rate ``lr``."""
    import optax

    import rmsprop_jax

    if kind == "rmsprop":
        return rmsprop_jax.rmsprop(lr)
    if kind == "adam":
        return optax.adam(lr)
    if kind == "sgd":
        return optax.sgd(lr, momentum=0.9)
    raise ValueError(f"kind={kind!r} is not an optimizer; allowed: 'rmsprop', 'adam', 'sgd'.")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rmsprop_jax.demo",
        description=(
            "Train a small Flax NNX CNN on scikit-learn's bundled 8x8 digits with rmsprop_jax.rmsprop, "
            "optax.adam and optax.sgd (momentum 0.9) under the same budget; print a results table and "
            "write a PNG of the loss curves."
        ),
    )
    parser.add_argument("--epochs", type=_positive_int, default=20, help="passes over the training set")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and minibatch order")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="minibatch size")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="directory for the PNG")
    return parser.parse_args(argv)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the results (one row per optimizer)."""
    header = "| optimizer | lr | test accuracy | test loss | final train loss | s/epoch |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['lr']:g} | {100 * r['test_acc']:.2f} % | {r['test_loss']:.4f} "
            f"| {r['train_loss']:.4f} | {r['s_per_epoch']:.3f} |"
        )
    return "\n".join(lines)


def plot(histories: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_train, ax_test) = plt.subplots(1, 2, figsize=(11, 4))
    for name, h in histories.items():
        steps = np.asarray(h.step_loss)
        window = max(1, len(steps) // 50)
        smooth = np.convolve(steps, np.ones(window) / window, mode="valid")
        ax_train.plot(np.arange(window - 1, len(steps)), smooth, label=name)
        ax_test.plot(np.arange(1, len(h.test_loss) + 1), h.test_loss, marker="o", ms=3, label=name)
    ax_train.set(xlabel="step", ylabel="train loss (moving average)", yscale="log", title="Training loss")
    ax_test.set(xlabel="epoch", ylabel="test loss", yscale="log", title="Test loss")
    for ax in (ax_train, ax_test):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Flax NNX CNN on scikit-learn digits: same model, data order and steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the demo; returns the table's rows (also printed)."""
    args = parse_args(argv)
    try:
        from tqdm.auto import tqdm

        from rmsprop_jax import _examples
    except ImportError as exc:
        raise _missing(exc) from exc
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise _missing(exc) from exc

    start = time.perf_counter()
    data = _examples.digits(val_fraction=0.0)  # no model selection here: train on all non-test images
    print(
        f"digits: {len(data.x_train)} train / {len(data.x_test)} test images, "
        f"{args.epochs} epochs of batch {args.batch_size}, seed {args.seed}"
    )
    rows, histories = [], {}
    with tqdm(total=len(OPTIMIZERS) * args.epochs, desc="training", unit="epoch", file=sys.stderr) as bar:
        for name, (kind, lr) in OPTIMIZERS.items():

            def progress(epoch: int, model: Any, optimizer: Any, history: Any, name: str = name) -> None:
                bar.set_postfix_str(f"{name}: test acc {100 * history.test_acc[-1]:.1f} %")
                bar.update(1)

            model = _examples.make_model("cnn", seed=args.seed)
            _, _, history = _examples.fit(
                model,
                make_tx(kind, lr),
                data,
                epochs=args.epochs,
                batch_size=args.batch_size,
                seed=args.seed,
                on_epoch=progress,
            )
            histories[name] = history
            rows.append(
                {
                    "name": name,
                    "lr": lr,
                    "test_acc": history.test_acc[-1],
                    "test_loss": history.test_loss[-1],
                    "train_loss": history.train_loss[-1],
                    "s_per_epoch": history.seconds_per_epoch,
                }
            )
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "loss_curves.png"
    plot(histories, png)
    print(f"loss curves: {png}")
    print(f"total time: {time.perf_counter() - start:.1f} s (s/epoch: median after the compiling first)")
    return rows


if __name__ == "__main__":
    main()
