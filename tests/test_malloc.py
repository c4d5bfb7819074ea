"""Workers keep the memory they free (decoupled/malloc.py): no page faults for the same buffers every step."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from decoupled.malloc import TUNABLES, children_keep_freed_memory, tunables_env

# Allocate, fill and free a 64 MiB tensor, as a training step does its activations: 10 steps
# to warm up (the heap grows to its steady size), then print the minor page faults of 10 more.
_STEPS = """
import resource, torch
for _ in range(10):
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", _STEPS], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_tunables_keep_a_users_own_settings():
    assert tunables_env(None) == ":".join(f"{k}={v}" for k, v in TUNABLES.items())
    mine = "glibc.malloc.arena_max=4:glibc.cpu.hwcaps=-AVX512F"
    merged = tunables_env(mine).split(":")
    assert merged[:2] == mine.split(":")  # the user's first, untouched
    assert "glibc.malloc.arena_max=1" not in merged and "glibc.malloc.mmap_max=0" in merged


def test_children_get_the_settings_and_the_environment_is_restored(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with children_keep_freed_memory():
        assert os.environ["GLIBC_TUNABLES"] == tunables_env()
    assert "GLIBC_TUNABLES" not in os.environ
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    with children_keep_freed_memory():
        assert os.environ["GLIBC_TUNABLES"].startswith("glibc.malloc.arena_max=4:")
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_freed_buffers_are_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    default = _faults(env)
    kept = _faults({**env, "GLIBC_TUNABLES": tunables_env()})
    # glibc's default maps and unmaps a 64 MiB block: each step faults its pages in again, at least
    # one fault per 2 MiB (transparent huge pages) and 16384 with 4 KiB pages
    assert default >= 10 * (64 >> 1)
    assert kept < default / 20
