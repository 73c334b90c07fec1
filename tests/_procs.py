"""The environment of a fresh CPU process that the tests start (no JAX imported here).

XLA reads ``XLA_FLAGS`` once, when JAX starts, so a test that needs several fake CPU devices (or
other flags) runs its check in a child process with this environment.
"""

from __future__ import annotations

import os
from pathlib import Path

# XLA:CPU runs a collective over n devices on n threads of its client pool, which it sizes at
# max(cores, n) -- exactly n on this 2-core machine, with no thread to spare for any other task.
# Under CI load (two pytest workers on 2 cores) one all-gather of an 8-device check saw 4 of its 8
# threads arrive within XLA's 40-s terminate timeout, and XLA aborted the process (CI run of
# 2026-12-03). PJRT_NPROC sizes the pool (xla/pjrt/utils.cc, DefaultThreadPoolSize): twice the devices
# leaves a second collective's worth of headroom; the longer timeout lets a rendezvous that is slow,
# not stuck, finish. Neither changes what is computed.
_COLLECTIVE_TIMEOUT_S = 300


def cpu_process_env(devices: int = 1, flags: str = "", *, pythonpath: tuple[Path, ...] = ()) -> dict:
    """``os.environ`` for a child on the CPU with ``devices`` fake devices and ``flags`` added to
    ``XLA_FLAGS``; ``pythonpath`` goes before the inherited ``PYTHONPATH``."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    add = [flags] if flags else []
    if devices > 1:
        add += [
            f"--xla_force_host_platform_device_count={devices}",
            f"--xla_cpu_collective_call_terminate_timeout_seconds={_COLLECTIVE_TIMEOUT_S}",
        ]
        env.setdefault("PJRT_NPROC", str(max(2 * devices, os.cpu_count() or 1)))
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *add]).strip()
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(
            [*(str(p) for p in pythonpath), *filter(None, [env.get("PYTHONPATH")])]
        )
    return env
