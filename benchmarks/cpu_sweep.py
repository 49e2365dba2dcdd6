"""The latency sweep of docs/benchmarks.md on CPU: `diffuserve bench` spawns a server on the built-in digits
model and drives it with locust at each user count; its summary and plots are the raw output.

    python benchmarks/cpu_sweep.py --out docs/bench       # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, log, out_dir


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", default="1,2,4,8,16")
    parser.add_argument("--iterations", type=int, default=48, help="requests per user count")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = out_dir(args.out)
    with tempfile.TemporaryDirectory(prefix="diffuserve-sweep-") as work:
        command = [sys.executable, "-m", "diffuserve.cli", "bench", "--spawn-server", "--users", args.users]
        command += ["--iterations", str(args.iterations), "--output", work, "--no-progress"]
        log(" ".join(command))
        subprocess.run(command, check=True, cwd=ROOT)
        for name, target in (
            ("summary.json", "cpu-sweep-summary.json"),
            ("latency.png", "cpu-sweep-latency.png"),
            ("throughput.png", "cpu-sweep-throughput.png"),
        ):
            shutil.copyfile(Path(work) / name, out / target)
            log(f"wrote {out / target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
