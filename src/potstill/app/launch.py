"""``potstill distill --nproc N``: the same command, relaunched under torchrun on this machine.

torchrun starts N copies of the command without ``--nproc`` (each then joins the process group,
:func:`potstill.core.distributed.init_from_env`), on 127.0.0.1 and a free port, one intra-op thread
each unless the recipe sets ``threads``. Its exit status is the run's. For several machines run
torchrun yourself (docs/distributed.md).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def launch_torchrun(nproc: int, argv: list[str], out: Path | None) -> int:
    """Run ``potstill <argv>`` (``--nproc`` dropped, ``--out`` fixed so every rank uses one run directory)."""
    args = without_nproc(argv)
    if out is not None and "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(out)]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--module", "potstill", *args]
    return subprocess.call(command, preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def _die_with_parent() -> None:
    """torchrun gets SIGKILL when this process dies, however it dies (and its ranks then stop too)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
