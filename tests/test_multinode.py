"""Multi-node on one machine: a Ray head and two worker nodes (each its own raylet process), a run
submitted with `ray job submit` as a cluster user would, and its stages on three different nodes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

from conftest import _cmdline, _descendants, assert_all_exit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def three_nodes(tmp_path):
    """A head (with the job API) and two workers, 1 CPU each, so a 3-stage run must use all three."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.cluster_utils import Cluster

    dashboard_port = free_port()
    before = _descendants(os.getpid())
    # every node's agent (it runs the submitted job) gets its own port: Ray's default one may be held
    # by another Ray on this machine (the tests' embedded one), and then no agent can take jobs
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port, "dashboard_agent_listen_port": free_port()})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", dashboard_agent_listen_port=free_port())
        cluster.wait_for_nodes()
        yield cluster, f"http://127.0.0.1:{dashboard_port}"
    finally:
        started = {p for p in _descendants(os.getpid()) - before if "ray" in _cmdline(p)}
        cluster.shutdown()
        assert_all_exit(started, "the cluster's shutdown", wait_s=30)


def test_a_job_submitted_to_a_three_node_cluster_runs_one_stage_per_node(three_nodes, tmp_path):
    cluster, job_api = three_nodes
    config = tmp_path / "three-nodes.yaml"
    config.write_text(yaml.safe_dump({
        "name": "three-nodes",
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [32, 32]},
        "split": {"stages": 3},
        "method": {"name": "dgl"},
        "cluster": {"cpus_per_worker": 1, "strategy": "SPREAD", "start_timeout_s": 120},
        "train": {"epochs": 1, "batch_size": 64, "threads": 1, "progress": False},
        "output": {"dir": str(tmp_path / "runs")},
    }))
    # what launch/ray-job documents: the job's driver reaches the cluster through RAY_ADDRESS, which
    # the job supervisor sets; the package is installed where the cluster's Python is (this venv)
    submit = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", job_api,
              "--submission-id", f"decoupled-{os.getpid()}", "--",
              sys.executable, "-m", "decoupled", "train", "--config", str(config)]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(submit, capture_output=True, text=True, timeout=420,
                              env={**os.environ, "RAY_ADDRESS": job_api})
        # a fresh head's job agent registers a few seconds after the dashboard answers; users
        # retrying `ray job submit` do the same
        if "No available agent to submit job" not in done.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Job 'decoupled-{os.getpid()}' succeeded" in done.stdout
    summary = json.loads((tmp_path / "runs" / "three-nodes" / "summary.json").read_text())
    nodes = [s["node_id"] for s in summary["stage_info"]]
    assert len(nodes) == 3 and len(set(nodes)) == 3, summary["stage_info"]  # one stage per node
    cluster_nodes = {n.node_id for n in [cluster.head_node, *cluster.worker_nodes]}
    assert set(nodes) == cluster_nodes
    assert summary["steps"] == 1437 // 64 and summary["test_accuracy"] > 0.3
