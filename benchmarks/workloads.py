"""Parameter trees and optimizer configurations measured by the suite.

Every workload is a plain dict pytree of float32 arrays. Sizes shrink in
``--quick`` mode so that the whole quick run stays under a minute on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

LR = 1e-3
DECAY = 0.9
EPS = 1e-8
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    shapes: dict[str, tuple[int, ...]]

    @property
    def num_leaves(self) -> int:
        return len(self.shapes)

    @property
    def num_params(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes.values()))


def _uniform(name: str, description: str, leaves: int, size: int) -> Workload:
    width = len(str(leaves - 1))
    return Workload(name, description, {f"p{i:0{width}d}": (size,) for i in range(leaves)})


def transformer_shapes(vocab: int, d: int, layers: int, context: int) -> dict[str, tuple[int, ...]]:
    """A GPT-like tree: embeddings, per layer attention + MLP matrices, biases and norms."""
    shapes: dict[str, tuple[int, ...]] = {"embed": (vocab, d), "pos_embed": (context, d)}
    for i in range(layers):
        pre = f"layer{i:02d}"
        shapes |= {
            f"{pre}.ln1.scale": (d,),
            f"{pre}.ln1.bias": (d,),
            f"{pre}.attn.qkv.kernel": (d, 3 * d),
            f"{pre}.attn.qkv.bias": (3 * d,),
            f"{pre}.attn.out.kernel": (d, d),
            f"{pre}.attn.out.bias": (d,),
            f"{pre}.ln2.scale": (d,),
            f"{pre}.ln2.bias": (d,),
            f"{pre}.mlp.up.kernel": (d, 4 * d),
            f"{pre}.mlp.up.bias": (4 * d,),
            f"{pre}.mlp.down.kernel": (4 * d, d),
            f"{pre}.mlp.down.bias": (d,),
        }
    shapes |= {"ln_f.scale": (d,), "ln_f.bias": (d,)}
    return shapes


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [
            _uniform("large_leaf", "1 leaf x 1M", 1, 1 << 20),
            _uniform("leaves_512", "32 leaves x 4k", 32, 4096),
            _uniform("leaves_2000", "64 leaves x 64", 64, 64),
            Workload("transformer", "GPT-like, d=64, 1 layer", transformer_shapes(1024, 64, 1, 128)),
        ]
    return [
        _uniform("large_leaf", "1 leaf x 16M", 1, 1 << 24),
        _uniform("leaves_512", "512 leaves x 32k", 512, 1 << 15),
        _uniform("leaves_2000", "2000 leaves x 64", 2000, 64),
        Workload(
            "transformer",
            "GPT-like, vocab 32000, d=384, 12 layers",
            transformer_shapes(32000, 384, 12, 512),
        ),
    ]


@dataclass(frozen=True)
class Config:
    name: str
    description: str
    centered: bool
    momentum: float | None
    weight_decay: float | None

    def stream_count(self) -> int:
        """float32 arrays moved per parameter by an ideal single-pass step incl. ``p += u``.

        Reads g, p, nu (+ mu, trace); writes p, nu (+ mu, trace).
        """
        state = 1 + int(self.centered) + int(self.momentum is not None)
        return 2 + 2 * state + 1


CONFIGS = [
    Config("plain", "decay=0.9, eps=1e-8", centered=False, momentum=None, weight_decay=None),
    Config(
        "centered_momentum_wd",
        "centered, momentum=0.9, weight_decay=1e-4 (coupled)",
        centered=True,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
    ),
]


def make_rmsprop_jax(cfg: Config, **extra: Any) -> Any:
    """``rmsprop_jax.rmsprop`` for ``cfg``; ``extra`` keywords (e.g. a state format) passed on."""
    import rmsprop_jax

    return rmsprop_jax.rmsprop(
        LR, DECAY, EPS, centered=cfg.centered, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **extra
    )


def make_optax(cfg: Config) -> Any:
    """optax with the same hyperparameters: coupled weight decay is add_decayed_weights first."""
    import optax

    opt = optax.rmsprop(LR, DECAY, EPS, centered=cfg.centered, momentum=cfg.momentum)
    if cfg.weight_decay:
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    return opt


def make_torch(cfg: Config, params: list[Any], **extra: Any) -> Any:
    """``torch.optim.RMSprop(foreach=True)``, the config's hyperparameters; ``extra``: e.g. capturable."""
    import torch

    return torch.optim.RMSprop(
        params,
        lr=LR,
        alpha=DECAY,
        eps=EPS,
        centered=cfg.centered,
        momentum=cfg.momentum or 0.0,
        weight_decay=cfg.weight_decay or 0.0,
        foreach=True,
        **extra,
    )
