"""kill -9 during ``NeuralKVDatabase.save``: the file must stay loadable, and the next save removes the temporaries.

    python benchmarks/experiments/save_kill_trials.py [--trials 20] [--rows 60000] [--dir /tmp/neuraldb-kill-trials]

A writer process loads a database, then adds one row and saves in a loop; it is killed with SIGKILL after a random
0.05-1.5 s. After each kill the file is loaded (checksums included); at the end one more save runs and the
temporaries beside the file are counted.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import neuraldb
import torch

_WRITER = r"""
import sys, torch, neuraldb
db = neuraldb.NeuralKVDatabase.load(sys.argv[1])
print("ready", flush=True)
while True:
    db.add(torch.randn(1, db.key_dim), torch.randn(1, db.value_dim))
    db.save(sys.argv[1])
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/neuraldb-kill-trials"), help="emptied first")
    args = ap.parse_args(argv)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    target = args.dir / "db.safetensors"
    db = neuraldb.NeuralKVDatabase(1536, 576)  # SmolLM2-135M's widths
    db.add(torch.randn(args.rows, 1536), torch.randn(args.rows, 576))
    db.save(target)
    rng = random.Random(0)
    corrupt, left = 0, 0
    for trial in range(args.trials):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()
        time.sleep(rng.uniform(0.05, 1.5))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        try:
            rows = len(neuraldb.NeuralKVDatabase.load(target))
        except (OSError, ValueError) as e:
            corrupt, rows = corrupt + 1, f"not loadable: {e}"
        temps = [f for f in args.dir.iterdir() if f != target]
        left += bool(temps)
        print(f"trial {trial}: {rows} rows; temporaries beside the file: {len(temps)}", flush=True)
    neuraldb.NeuralKVDatabase.load(target).save(target)
    after = [f for f in args.dir.iterdir() if f != target]
    print(
        f"corrupt loads: {corrupt}/{args.trials}; trials that left a temporary: {left}; after the next save: {len(after)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
