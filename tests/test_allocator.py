import os
import subprocess
import sys
from pathlib import Path

from opd.allocator import HEAP_TUNABLES

SHOW = "from opd.allocator import reexec_with_heap_tunables as r; r(); import os; print(os.environ.get('GLIBC_TUNABLES'))"


def _run(env_extra: dict, drop=("GLIBC_TUNABLES", "OPD_MALLOC")) -> str:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run([sys.executable, "-c", SHOW], env={**env, **env_extra}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_opd_reexecutes_itself_once_with_the_heap_tunables():
    assert _run({}) == HEAP_TUNABLES  # re-executed with the same command line, which then returns at once


def test_a_users_own_tunables_or_opd_malloc_system_are_left_alone():
    assert _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == "glibc.malloc.arena_max=2"
    assert _run({"OPD_MALLOC": "system"}) == "None"


def test_the_makefile_tests_under_the_same_tunables():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert f"HEAP_TUNABLES := {HEAP_TUNABLES}\n" in makefile
