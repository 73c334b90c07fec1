"""Two processes under ``jax.distributed`` against one process, run by ``tests/test_multiprocess.py``.

``drive()`` starts three processes of this script at once: two workers (``jax.distributed`` on
CPU over gloo, 4 devices each) and a reference (one process, 8 devices). Each builds the same
(2, 4) mesh ("proc", "dev") over its 8 devices, shards a (512, 256) matrix by rows over all of
them (``P(("proc", "dev"), None)``: 64 rows per device) and its (256,) bias alike, and for every
format jit-compiles ``init`` and one training step (``tx.update`` then ``optax.apply_updates``)
and runs it for ``N_STEPS`` fixed gradients. Each writes, per device, the bytes of every shard of
the params and the state, and the collectives in its compiled step; ``drive`` compares every shard
with the reference's array at that index, bit for bit. Only NumPy is imported here outside a worker.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _procs import cpu_process_env

HERE = Path(__file__).parent
N_STEPS = 3
SHAPES = {"b": (256,), "w": (512, 256)}  # the bias stays float32 (below every format's min_size)
TIMEOUT_S = 240


def _configs() -> dict:
    import jax.numpy as jnp

    import rmsprop_jax

    out = {}
    for name, acc in (("float32", None), ("int8", "int8"), ("int4", "int4"), ("fp8", "fp8")):
        out[name] = rmsprop_jax.rmsprop(1e-2, accumulator_dtype=acc)
        out[f"{name}_centered_momentum"] = rmsprop_jax.rmsprop(
            1e-2, centered=True, momentum=0.9, accumulator_dtype=acc
        )
    out["bf16_stochastic"] = rmsprop_jax.rmsprop(1e-2, accumulator_dtype=jnp.bfloat16)
    return out


def _values(seed: int) -> tuple[dict, list[dict]]:
    """The params and ``N_STEPS`` gradients, as NumPy, the same in every process."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [
        {k: ((1 + t) * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
        for t in range(N_STEPS)
    ]
    return params, grads


def _raw(x: np.ndarray) -> np.ndarray:
    """The bits, as unsigned integers of the same shape (float8, bfloat16, NaN: compared exactly)."""
    return x.copy(order="C").view(f"u{x.dtype.itemsize}")


def work(role: str, out: Path, port: int | None, seed: int) -> None:
    """One process: a worker ("0", "1") under jax.distributed, or the reference ("ref")."""
    import jax

    if role != "ref":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=2,
            process_id=int(role),
            local_device_ids=list(range(4)),
        )
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from tiles_check import _collectives

    assert jax.device_count() == 8, jax.devices()
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devices).reshape(2, 4), ("proc", "dev"))
    rows = ("proc", "dev")
    shardings = {"b": NamedSharding(mesh, P(rows)), "w": NamedSharding(mesh, P(rows, None))}

    def place(tree):
        return {
            k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
            for k, v in tree.items()
        }

    params0, grads_np = _values(seed)
    grads = [place(g) for g in grads_np]
    meta: dict = {"process_count": jax.process_count(), "configs": {}}
    blobs = {}
    for name, tx in _configs().items():

        def step(params, state, grads, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        params = place(params0)
        state = jax.jit(tx.init)(params)
        compiled = jax.jit(step).lower(params, state, grads[0]).compile()
        for g in grads:
            params, state = compiled(params, state, g)
        leaves, _ = jax.tree_util.tree_flatten_with_path((params, state))
        entry = {"collectives": _collectives(compiled.as_text()), "leaves": []}
        for i, (path, x) in enumerate(leaves):
            shards = []
            for j, s in enumerate(x.addressable_shards):
                blobs[f"{name}/{i}/{j}"] = _raw(np.asarray(s.data))
                shards.append([[sl.start, sl.stop] for sl in s.index])
            leaf = {"path": jax.tree_util.keystr(path), "dtype": str(x.dtype), "shape": list(x.shape)}
            entry["leaves"].append({**leaf, "shards": shards})
        meta["configs"][name] = entry
    np.savez(out / f"{role}.npz", **blobs)
    (out / f"{role}.json").write_text(json.dumps(meta))
    if role != "ref":
        jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _index(bounds: list) -> tuple:
    return tuple(slice(a, b) for a, b in bounds)


def _compare(ref: tuple, workers: dict) -> dict:
    """Per config: the shards (on any worker's device) that differ from the reference's array at
    their index, and the leaves whose elements no worker holds."""
    ref_meta, ref_npz = ref
    out = {}
    for name, want in ref_meta["configs"].items():
        bad, uncovered = [], []
        for i, rleaf in enumerate(want["leaves"]):
            # the reference is one process: its shards cover its array; assemble it
            full = np.zeros(rleaf["shape"], ref_npz[f"{name}/{i}/0"].dtype)
            for j, bounds in enumerate(rleaf["shards"]):
                full[_index(bounds)] = ref_npz[f"{name}/{i}/{j}"]
            held = np.zeros(rleaf["shape"], bool)
            for role, (meta, npz) in workers.items():
                leaf = meta["configs"][name]["leaves"][i]
                if (leaf["path"], leaf["dtype"], leaf["shape"]) != (
                    rleaf["path"],
                    rleaf["dtype"],
                    rleaf["shape"],
                ):
                    bad.append(f"{role}: {leaf['path']} {leaf['dtype']}{leaf['shape']} vs {rleaf['dtype']}")
                    continue
                for j, bounds in enumerate(leaf["shards"]):
                    held[_index(bounds)] = True
                    if not np.array_equal(npz[f"{name}/{i}/{j}"], full[_index(bounds)]):
                        bad.append(f"{role}: {leaf['path']} shard {bounds}")
            if not held.all():
                uncovered.append(rleaf["path"])
        out[name] = {"mismatch": bad, "uncovered": uncovered}
    return out


def drive(seed_ref: int = 0) -> dict:
    """Run the two workers and the reference; the comparison and the collectives, per config.

    ``seed_ref`` other than 0 gives the reference other params and gradients (the check can fail).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        port = _free_port()
        # PYTHONPATH as given: CI installs the package
        envs = {r: cpu_process_env(8 if r == "ref" else 4) for r in ("0", "1", "ref")}
        logs = {r: open(out / f"{r}.log", "w+") for r in envs}  # closed below
        procs = {
            role: subprocess.Popen(
                [sys.executable, str(Path(__file__)), role, str(out), str(port), str(seed)],
                env=envs[role],
                stdout=logs[role],
                stderr=subprocess.STDOUT,
            )
            for role, seed in (("0", 0), ("1", 0), ("ref", seed_ref))
        }
        # A worker that fails leaves the other waiting for it: stop all at the first failure.
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                codes = [p.poll() for p in procs.values()]
                if all(c == 0 for c in codes) or any(c for c in codes):
                    break
                time.sleep(0.1)
        finally:
            killed = [r for r, p in procs.items() if p.poll() is None]
            for r in killed:
                procs[r].kill()
            for p in procs.values():
                p.wait()
        failed = []
        for role, p in procs.items():
            logs[role].seek(0)
            log = logs[role].read()
            logs[role].close()
            if role in killed:
                why = "timed out" if time.monotonic() >= deadline else "stopped after another failed"
                failed.append(f"--- {role}: {why} (limit {TIMEOUT_S} s)\n{log}")
            elif p.returncode:
                failed.append(f"--- {role}: exit {p.returncode}\n{log}")
        if failed:
            raise RuntimeError("multiprocess_check worker failed:\n" + "\n".join(failed))
        metas = {r: json.loads((out / f"{r}.json").read_text()) for r in procs}
        data = {r: (metas[r], np.load(out / f"{r}.npz")) for r in procs}
        compared = _compare(data["ref"], {r: data[r] for r in ("0", "1")})
        return {
            "process_counts": {r: m["process_count"] for r, m in metas.items()},
            "shards_per_process": {
                r: len(m["configs"]["float32"]["leaves"][-1]["shards"]) for r, m in metas.items()
            },
            "cases": {
                name: {
                    **compared[name],
                    "leaves": {leaf["path"]: leaf["dtype"] for leaf in entry["leaves"]},
                    "collectives": {r: metas[r]["configs"][name]["collectives"] for r in procs},
                }
                for name, entry in metas["ref"]["configs"].items()
            },
        }


if __name__ == "__main__":
    if len(sys.argv) > 1:  # a worker or the reference: role, out dir, port, seed
        role, out, port, seed = sys.argv[1:]
        work(role, Path(out), int(port), int(seed))
    else:
        print("MULTIPROCESS_REPORT " + json.dumps(drive()))
