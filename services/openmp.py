"""Which OpenMP runtime a process that runs torch on the CPU uses, chosen before torch loads.

torch's CPU wheels bring GNU OpenMP (libgomp). libgomp counts every thread it manages,
including the process's first thread, and once that count exceeds the CPUs it stops spinning
between parallel regions: each region then pays a futex wake-up. Our generation engine and
the trainers' rollouts run torch on a worker thread, never the first, so on 2 cores libgomp
is always in that state. Measured here (SmolLM2-135M decode step, 16 rows): 66 ms on the main
thread, 98-105 ms on a worker thread; with Intel's OpenMP (libiomp5, PyTorch's CPU tuning
guide: LD_PRELOAD it, KMP_BLOCKTIME=1) 61-66 / 65-72 ms. README, "Generation speed".

A runtime can only be swapped before the process starts, so `relaunch_with_intel_openmp`
re-executes the current command once with LD_PRELOAD set, when the library is installed (the
`intel-openmp` wheel, an x86-64 dependency of the `ml` extra) and the setting allows it.
Nothing here imports torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

LIBRARY = "libiomp5.so"
MARKER = "OUTCOMELOOP_OPENMP_RELAUNCHED"
BLOCKTIME = "1"  # ms a worker spins after a region before it sleeps (PyTorch's guide)


def intel_openmp_library(prefixes: list[str] | None = None) -> Path | None:
    """libiomp5.so where the intel-openmp wheel puts it (<prefix>/lib), or None."""
    for prefix in prefixes or [sys.prefix, sys.base_prefix]:
        candidate = Path(prefix) / "lib" / LIBRARY
        if candidate.is_file():
            return candidate
    return None


def relaunch_environment(
    environ: Mapping[str, str], library: Path | None, runtime: str
) -> dict[str, str] | None:
    """The environment to re-execute with, or None to go on as is: when the runtime setting
    is `intel`, the library exists, it is not preloaded already and this is not the relaunch."""
    if runtime != "intel" or library is None or environ.get(MARKER):
        return None
    preload = [p for p in environ.get("LD_PRELOAD", "").split(":") if p]
    if any(Path(p).name == LIBRARY for p in preload):
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join([str(library), *preload])
    env.setdefault("KMP_BLOCKTIME", BLOCKTIME)
    env[MARKER] = "1"
    return env


def active_runtime() -> str:
    """`intel` when libiomp5 is loaded in this process, else `bundled`."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    return "intel" if LIBRARY in maps else "bundled"


def relaunch_with_intel_openmp(runtime: str) -> None:
    """Re-execute this process's command line under Intel's OpenMP (see the module's note).
    Returns only when no relaunch is needed or possible; torch must not be imported yet."""
    if "torch" in sys.modules:
        return
    env = relaunch_environment(os.environ, intel_openmp_library(), runtime)
    if env is None:
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
