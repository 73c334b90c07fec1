"""The benchmark suite: rmsprop_jax against optax (and PyTorch), one process, interleaved.

Run from the repository root::

    python -m benchmarks.run                      # every section, full sizes
    python -m benchmarks.run --quick              # every section, small sizes (what CI runs)
    python -m benchmarks.run --only step,manyleaf # some sections (and optionally workloads, below)
    python -m benchmarks.run --render benchmarks/results/cpu-2core/manyleaf.json   # tables + plot

Sections (``--only`` takes a comma-separated list of section names; further names in the list
select workloads, trees, configs or models inside the sections that have them, e.g.
``--only manyleaf,leaves_2000x64,plain`` or ``--only lowmem,leaf_256m``):

* ``step``     step time, compile, memory and numerics vs optax and torch on four workloads, plus the
               jit/donation training-step table -> ``results.json/.md/.png``
* ``lowmem``   state formats (float32, bf16 stochastic rounding, int8): bytes/param, step cost,
               stored-state error -> ``lowmem.*``
* ``manyleaf`` many small leaves: per-leaf vs ``packed=True`` vs ``optax.flatten`` vs optax vs one
               leaf, dispatched / in-loop / compile -> ``manyleaf.*``
* ``quality``  digits CNN / GRU and a noisy quadratic trained with each state format ->
               ``lowmem_quality.*``

Results land in ``benchmarks/results/<machine-tag>[-quick]/`` (``--out`` to change). Every module
here uses the public API of ``rmsprop_jax`` only. See ``benchmarks/README.md`` for every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: `benchmarks` (which adds src/) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks  # noqa: F401  (puts src/ on the path in a fresh clone)
from benchmarks.common import ROOT, loadavg, machine_info, machine_tag, torch_device

SECTIONS = ("step", "lowmem", "manyleaf", "quality")


def _module(section: str) -> Any:
    import importlib

    return importlib.import_module(f"benchmarks.{section}")


def write(section: str, data: dict[str, Any], out: Path, json_too: bool = True) -> None:
    """``<output>.json`` (unless rendering), ``.md`` and ``.png`` of one section."""
    mod = _module(section)
    out.mkdir(parents=True, exist_ok=True)
    if json_too:
        (out / f"{mod.OUTPUT}.json").write_text(json.dumps(data, indent=1))
    (out / f"{mod.OUTPUT}.md").write_text(mod.markdown(data))
    mod.plot(data, out / f"{mod.OUTPUT}.png")


def section_of(data: dict[str, Any]) -> str:
    """Which section wrote a JSON (also the files written before the suite had sections)."""
    if "section" in data:
        return str(data["section"])
    if "manyleaf" in data:
        return "manyleaf"
    if "runs" in data:
        return "quality"
    if "modes" in data:
        return "lowmem"
    return "step"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (what CI runs)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default results/<machine-tag>)")
    ap.add_argument(
        "--only",
        default=None,
        help=f"comma-separated sections ({', '.join(SECTIONS)}; default all), plus workload / tree / "
        "config / model names to narrow them",
    )
    ap.add_argument("--render", type=Path, default=None, help="only rebuild .md/.png from this JSON")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch even if it is installed")
    ap.add_argument("--no-training-step", action="store_true", help="step: skip the jit/donation MLP table")
    ap.add_argument("--big", action="store_true", help="lowmem: add one 256M-element leaf (for a GPU)")
    ap.add_argument(
        "--impls",
        default=None,
        help="manyleaf: comma-separated subset of default,packed,optax,optax.flatten,one_leaf "
        "(default, packed and optax are always needed)",
    )
    ap.add_argument("--no-loop", action="store_true", help="manyleaf: skip the in-loop (fori_loop) programs")
    ap.add_argument(
        "--budget", type=float, default=None, help="manyleaf: start no new group after this many seconds"
    )
    ap.add_argument("--seeds", default=None, help="quality: comma-separated seeds (default 0,1,2,3; quick 0)")
    args = ap.parse_args(argv)

    if args.render is not None:
        data = json.loads(args.render.read_text())
        write(section_of(data), data, args.out or args.render.parent, json_too=False)
        return 0

    words = set(args.only.split(",")) if args.only else set()
    sections = [s for s in SECTIONS if s in words] or list(SECTIONS)
    names = words - set(SECTIONS)
    info = machine_info()
    out = args.out or ROOT / "benchmarks" / "results" / (machine_tag(info) + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {info['cpu_model']} ({info['cpu_cores']} cores), "
        f"{info['platform']} {info['device_kind']}; "
        f"commit {info['git_commit']}; sections {','.join(sections)}",
        flush=True,
    )
    t_start = time.perf_counter()
    from benchmarks import step

    step.warm_up()  # JAX's one-time compiles, before any measured compile
    tdev = None if args.no_torch else torch_device()

    def envelope(section: str, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "schema": 2,
            "section": section,
            "timestamp_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "quick": args.quick,
            "machine": info,
            "loadavg_1min_end": loadavg(),
        } | body

    for section in sections:
        t0 = time.perf_counter()
        print(f"section {section}", flush=True)
        if section == "step":
            body = step.run_section(args.quick, names, tdev, training_step=not args.no_training_step)
        elif section == "lowmem":
            from benchmarks import lowmem

            body = lowmem.run_section(args.quick, names, big=args.big)
        elif section == "manyleaf":
            from benchmarks import manyleaf

            def save(sec: dict[str, Any]) -> None:  # after every group: a timed-out run keeps its groups
                write("manyleaf", envelope("manyleaf", {"manyleaf": sec}), out)

            sec = manyleaf.run_section(
                names,
                args.quick,
                args.budget,
                torch_cuda=tdev == "cuda",
                loop=not args.no_loop,
                on_group=save,
                impls=None if args.impls is None else args.impls.split(","),
            )
            body = {"manyleaf": sec}
        else:
            from benchmarks import quality

            seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
            body = quality.run_section(args.quick, names, seeds)
        write(section, envelope(section, body), out)
        print(f"  wrote {out}/{_module(section).OUTPUT}.* in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"done in {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
