"""Keep freed memory inside the process: glibc malloc tunables for the `opd` command (and `bench/`).

A CPU training step allocates and frees the same large tensors every step (activations, [positions, vocab]
logits, gradients). glibc serves every block over 32 MB-or-less with a fresh mmap and unmaps it on free, so the
kernel page-faults and zeroes that memory again on every step: on 2 cores this was a third of the update's CPU
time (4.5 s of kernel time in 4 updates of the SmolLM2 half-depth student) and the update and teacher ran
1.8x faster without it (bench/NOTES.md). With `mmap_max=0` every block comes from the heap, and with a huge
`trim_threshold` the heap is never given back, so a step reuses the pages the previous step touched. The cost:
the process keeps its peak memory until it exits, as a caching allocator would.

GLIBC_TUNABLES is read when a process starts, so `opd` re-executes itself once with it set. Nothing happens when
GLIBC_TUNABLES is already set (yours wins), on a C library other than glibc, or with OPD_MALLOC=system.
"""

from __future__ import annotations

import os
import platform
import sys

HEAP_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def wanted() -> bool:
    return (os.environ.get("OPD_MALLOC", "") != "system" and "GLIBC_TUNABLES" not in os.environ
            and sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")


def reexec_with_heap_tunables() -> None:
    """Replace this process by the same command line with GLIBC_TUNABLES = HEAP_TUNABLES (returns if not wanted)."""
    if not wanted():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": HEAP_TUNABLES})


def main() -> None:
    """The `opd` console script: re-execute with the heap tunables (once), then run the CLI."""
    reexec_with_heap_tunables()
    from opd.cli import app

    app()
