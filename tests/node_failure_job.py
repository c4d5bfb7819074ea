"""A Ray cluster of a head and three worker nodes on this machine; a K=2 run spread over them; the node
running stage 1 removed mid-run. Run by tests/test_reliability.py in its own process:

    python tests/node_failure_job.py OUT_DIR    (prints one JSON line)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only; read when ray is imported

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import decoupled  # noqa: E402
from decoupled import checkpoint  # noqa: E402


def config(out: Path, name: str) -> dict:
    return {"name": name, "runtime": "ray", "data": {"name": "digits"},
            "model": {"name": "mlp", "hidden": [64, 64, 64]}, "split": {"stages": 2},
            "optimizer": {"lr": 0.05}, "method": {"name": "dgl"},
            "cluster": {"cpus_per_worker": 1, "strategy": "SPREAD"}, "links": {"timeout_s": 30},
            "checkpoint": {"every_steps": 20},
            "train": {"epochs": 6, "batch_size": 32, "threads": 1, "progress": False, "metrics_every_s": 0.5},
            "output": {"dir": str(out)}}


def main(out: Path) -> dict:
    # the head holds no CPU: stages go to the worker nodes, one per node (SPREAD)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                             "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    seen: dict = {}

    def remove_node_of_stage_1(run: Path) -> None:
        while True:
            found = checkpoint.latest(run) if run.exists() else None
            if found and found[1]["steps_done"] >= 60:
                workers = json.loads((run / "workers.json").read_text())["stages"]
                victim = next(n for n in nodes if n.node_id == workers[1]["node_id"])
                seen.update(workers_before=workers, removed={"node_id": victim.node_id,
                                                             "at_step": found[1]["steps_done"]})
                cluster.remove_node(victim, allow_graceful=False)
                # A lost machine takes its processes with it; on one machine the stage's worker process
                # can outlive its killed raylet for a while (it trains over gloo, not through the raylet).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(workers[1]["pid"], signal.SIGKILL)
                return
            time.sleep(0.02)

    try:
        threading.Thread(target=remove_node_of_stage_1, args=(out / "hit",), daemon=True).start()
        summary = decoupled.train(config(out, "hit"))
        after = json.loads((out / "hit" / "workers.json").read_text())["stages"]
        calm = decoupled.train(config(out, "calm"))  # same seed, on the nodes left, nothing removed
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {**seen, "workers_after": after, "summary": summary,
            "undisturbed": {"test_accuracy": calm["test_accuracy"], "restarts": calm["restarts"]}}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
