"""A headless-browser screenshot of `decoupled dashboard` serving a run directory.

    python benchmarks/screenshot_dashboard.py RUN_DIR --out dashboard.png

Starts the dashboard on a free loopback port, waits until TensorBoard has loaded every run,
captures the Custom Scalars tab with Chromium (Debian: `apt-get install chromium`), and stops
the dashboard it started.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--size", default="1600,2200", help="window WIDTH,HEIGHT in pixels")
    parser.add_argument("--tab", default="custom_scalars", help="TensorBoard tab (custom_scalars, scalars, ...)")
    args = parser.parse_args()
    if not args.chromium:
        sys.exit("--chromium: no chromium on PATH (Debian: apt-get install chromium)")
    dashboard = subprocess.Popen([sys.executable, "-m", "decoupled", "dashboard", str(args.run_dir), "--port", "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in dashboard.stdout:
            found = re.search(r"TensorBoard at (http://\S+/)", line)
            if found:
                url = found.group(1)
                break
            print(line, end="", file=sys.stderr)
        if url is None:
            sys.exit(f"decoupled dashboard exited ({dashboard.wait()}) without serving")
        # TensorBoard loads runs in the background: wait until the list stops growing
        runs, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(2)
            with urllib.request.urlopen(url + "data/runs", timeout=30) as reply:
                now = json.loads(reply.read())
            if now and now == runs:
                break
            runs = now
        print(f"{len(runs)} runs at {url}", file=sys.stderr)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # --virtual-time-budget: let the page's scripts fetch and draw every chart before the capture
        subprocess.run([args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={args.size}", "--virtual-time-budget=30000",
                        f"--screenshot={args.out.resolve()}", f"{url}#{args.tab}"],
                       check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"wrote {args.out}")
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
