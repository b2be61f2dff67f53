"""Start-up time of ``locus --help`` and ``locus --version`` (target: under 300 ms).

Run: ``.venv/bin/python tests/benchmarks/bench_cli_startup.py [--rounds 15]``

Each round starts fresh processes of ``python -c pass`` (the floor every Python program
pays), ``locus --version`` and ``locus --help``, in rotating order so that a drift of the
shared machine falls on all three alike, and prints the medians, minima and the ratio of
each to bare Python in the same run.  The commands are imported lazily (``node.cli``), so
the root help costs click and the entry-point scan, not torch, pynetdicom or SQLAlchemy.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS: dict[str, list[str]] = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "locus --version": [sys.executable, "-c", "from node.cli import main; main()", "--version"],
    "locus --help": [sys.executable, "-c", "from node.cli import main; main()", "--help"],
}


def once(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    names = list(COMMANDS)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm the page cache once
        once(COMMANDS[n])
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n].append(once(COMMANDS[n]))
    floor = statistics.median(times["python -c pass"])
    for n in names:
        med = statistics.median(times[n])
        print(f"{n:16s} median {med * 1000:7.1f} ms  min {min(times[n]) * 1000:7.1f} ms  "
              f"{med / floor:5.1f}x bare python  ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
