"""The entry points' huge pages (bigalign/host_memory.py): a command without the glibc
tunable re-executes itself once with it, keeping the tunables it had; one that has it,
or turns it off, runs as it is. A process boundary is the point: glibc reads tunables
only at start."""

import os
import subprocess
import sys

from bigalign import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prints "start" each time the process starts, then the tunables it ends up with.
SCRIPT = ("import os; print('start', flush=True); from bigalign import host_memory; "
          "host_memory.use_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))")


def run(**environ) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BIGALIGN_HUGE_PAGES")}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env={**base, **environ}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_a_command_without_the_tunable_restarts_once_with_it_and_keeps_its_others():
    kept = "glibc.malloc.arena_max=4"
    if host_memory.needs_tunable({"GLIBC_TUNABLES": kept}):  # Linux, glibc, THP on request
        assert run(GLIBC_TUNABLES=kept) == ["start", "start", f"{kept}:{host_memory.TUNABLE}"]
    else:
        assert run(GLIBC_TUNABLES=kept) == ["start", kept]


def test_a_command_with_the_tunable_or_turned_off_runs_as_it_is():
    assert run(GLIBC_TUNABLES=host_memory.TUNABLE) == ["start", host_memory.TUNABLE]
    assert run(BIGALIGN_HUGE_PAGES="0") == ["start", "None"]


def test_the_package_loads_without_jax_so_a_restart_before_it_is_cheap():
    """`python -m bigalign.train` imports the package before the trainer's restart: that
    import must not load jax (2.5 s), which bigalign.build and bigalign.losses still do."""
    script = ("import sys, bigalign; print('jax' in sys.modules); "
              "bigalign.build; bigalign.losses; print('jax' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]
