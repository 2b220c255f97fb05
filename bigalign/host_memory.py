"""Transparent huge pages for the buffers XLA:CPU allocates at every step.

Why: XLA:CPU mallocs a step's temporaries (1.2 GiB for the ViT-Ti CLIP of
docs/benchmarks.md at batch 64) at every execution and frees them after it. glibc maps
allocations that large afresh each time, so every step touches about 300k new 4 KiB
pages, which the kernel faults in and zeroes one by one: a third of that step on a
2-core VM. With glibc's `glibc.malloc.hugetlb=1` tunable malloc asks for transparent
huge pages (2 MiB) where the kernel grants them on request (THP mode "madvise"): 300x
fewer faults and a 1.4-1.6x faster step there. On accelerators it changes nothing that
matters (their buffers are not malloc'd) and costs one re-execution at start.

glibc reads tunables only when a process starts, so the command-line entry points call
`use_huge_pages()` first: it re-executes the same command once with the tunable added.
The trainer and `bigalign.evaluate` call it before they import jax (`import bigalign`
does not), so the restart costs about 0.05 s, not the 2.5 s of loading jax twice.
`BIGALIGN_HUGE_PAGES=0` turns it off.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def needs_tunable(environ=os.environ) -> bool:
    """Whether this process would gain huge pages from the tunable: Linux with glibc,
    THP granted on request ("[madvise]"; "[always]" needs nothing), the tunable not yet
    set, and not turned off."""
    if environ.get("BIGALIGN_HUGE_PAGES") == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open(THP_MODE, encoding="ascii") as mode:
            return "[madvise]" in mode.read()
    except OSError:
        return False


def with_tunable(environ) -> dict:
    """A copy of `environ` with the tunable added to its GLIBC_TUNABLES."""
    tunables = [environ.get("GLIBC_TUNABLES"), TUNABLE]
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, tunables))}


def use_huge_pages() -> None:
    """Re-executes this command (interpreter flags and arguments as given) with the
    tunable set, if it needs it; otherwise returns."""
    if not needs_tunable():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_tunable(os.environ))
