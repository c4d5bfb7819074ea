"""Shared fixtures: one embedded Ray for the whole session, and a check that it leaves nothing behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest


def _descendants(pid: int) -> set[int]:
    """Process ids below ``pid`` (read from /proc: no extra dependency)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


def assert_all_exit(pids: set[int], what: str, wait_s: float = 20) -> None:
    """Wait up to ``wait_s`` for ``pids`` to end; fail naming any still running."""
    deadline = time.time() + wait_s
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    left = {p: _cmdline(p) for p in pids if _alive(p)}
    assert not left, f"processes left after {what}: {left}"


@pytest.fixture(scope="session")
def ray_cluster():
    """An embedded Ray with 2 CPUs on loopback; at the end, every process it started must be gone."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only; read when ray is imported
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
             log_to_driver=False)
    yield ray
    started = {p for p in _descendants(os.getpid()) if "ray" in _cmdline(p)}  # Ray's processes, not other tests'
    ray.shutdown()
    assert_all_exit(started, "ray.shutdown()")
