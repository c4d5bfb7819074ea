"""Speed-up over one worker against K, per method, from ``decoupled plan --json`` files.

    python benchmarks/plot_scaling.py scaling.png k2.json k4.json k8.json k16.json
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, files: list[str]) -> None:
    plans = sorted((json.load(open(f)) for f in files), key=lambda p: p["workers"])
    ks = [p["workers"] for p in plans]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in [r["label"] for r in plans[0]["predictions"] if r["mode"] != "single"]:
        ys = []
        for p in plans:
            single = next(r["samples_per_sec"] for r in p["predictions"] if r["mode"] == "single")
            ys.append(next(r["samples_per_sec"] for r in p["predictions"] if r["label"] == label) / single)
        ax.plot(ks, ys, marker="o", label=label)
    ax.plot(ks, ks, color="grey", linestyle=":", label="K× (ideal)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("workers K")
    ax.set_ylabel("predicted samples/s ÷ one worker")
    ax.set_title(plans[0]["device"], fontsize="small")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
