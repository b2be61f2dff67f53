"""Long fuzz run over the four targets of :mod:`tests.fuzz.targets` (issue 12).

Usage (from the repository root, with the test extra installed)::

    PYTHONPATH=$PWD python -m tests.fuzz.long_run --cases 100000 --seed 12 --out fuzz-out

Cases are drawn with :mod:`random` from ``--seed`` (the same seed gives the same cases),
spread over the targets by ``--weights`` (default parse 55 %, suv 20 %, sr 15 %, seg
10 %: the cheap C-STORE parse path gets the most cases).  Each case runs under a
``--hang-s`` wall-clock alarm.  The run counts, per target:

* **statuses**: the status label the target returned (a DICOM status of the listener,
  or an error code of the pipeline), i.e. the defined outcomes;
* **crashes**: an exception the contract does not allow (anything but the target's
  defined error types);
* **contract violations**: a result that breaks a stated property;
* **hangs**: a case still running after ``--hang-s``;
* **slow**: a case that finished with a defined outcome but took longer than ``--slow-s``
  (reproducer kept: a resource finding, e.g. a huge allocation from a forged size).

Every crash, violation and hang is written as a JSON reproducer under ``--out``
(``target`` and ``args``), replayable with ``--replay FILE``; a found crash becomes a
regression test in tests/fuzz/test_fuzz.py.  ``summary.json`` and a Markdown table (the
figures quoted in the README) are written at the end.  The run is single-process and
needs no network; 100,000 cases take about an hour on one core.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import random
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from tests.fuzz import targets as T

BYTE_KINDS = ("flip", "flip", "set", "u16", "u32", "insert", "delete", "truncate")
STRUCT_ACTIONS = ("delete", "raw", "raw", "raw", "drop_item", "dup_item")


class Hang(BaseException):
    """A case ran past --hang-s (a BaseException: the targets' own ``except Exception`` must not swallow it)."""


def byte_ops(rng: random.Random, max_ops: int = 4) -> T.Ops:
    ops: T.Ops = []
    for _ in range(rng.randint(1, max_ops)):
        kind = rng.choice(BYTE_KINDS)
        where = rng.randrange(1 << 24)
        focus = "head" if rng.random() < 0.85 else "all"
        if kind == "u32":
            value: Any = rng.choice((*T.BOUNDARY_U32, rng.randrange(1 << 32)))
        elif kind == "u16":
            value = rng.choice((*T.BOUNDARY_U16, rng.randrange(1 << 16)))
        elif kind == "insert":
            value = rng.choice((bytes(rng.randrange(256) for _ in range(rng.randint(1, 12))),
                                b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00",
                                b"SQ\x00\x00\xff\xff\xff\xff"))
        elif kind == "delete":
            value = rng.randint(1, 16)
        else:
            value = rng.randrange(256)
        ops.append((kind, where, value, focus) if kind != "truncate" else (kind, where, 0, focus))
    return ops


def struct_ops(rng: random.Random, max_ops: int = 4) -> T.Ops:
    return [(rng.choice(STRUCT_ACTIONS), rng.randrange(1 << 16), rng.randrange(1 << 8))
            for _ in range(rng.randint(1, max_ops))]


def draw(target: str, rng: random.Random) -> tuple[Any, ...]:
    """The arguments of one case of ``target``."""
    mode = "bytes" if rng.random() < 0.5 else "struct"
    if target == "parse":
        return (rng.randrange(1 << 16), byte_ops(rng))
    if target == "suv":
        return (rng.randrange(1 << 16), struct_ops(rng), rng.random() < 0.3)
    return (rng.randrange(1 << 16), mode, byte_ops(rng) if mode == "bytes" else struct_ops(rng))


def _jsonable(args: tuple[Any, ...]) -> list[Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, bytes):
            return {"hex": v.hex()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(list(args))


def from_json(args: list[Any]) -> tuple[Any, ...]:
    """Arguments of a reproducer file, as the target takes them."""
    def conv(v: Any) -> Any:
        if isinstance(v, dict) and "hex" in v:
            return bytes.fromhex(v["hex"])
        if isinstance(v, list):
            return tuple(conv(x) for x in v)
        return v
    out = [conv(a) for a in args]
    return tuple(list(a) if isinstance(a, tuple) else a for a in out)


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


def run(cases: int, seed: int, weights: dict[str, float], hang_s: float, out: Path,
        slow_s: float = 2.0) -> dict[str, Any]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    names = list(weights)
    stats: dict[str, dict[str, Any]] = {
        n: {"cases": 0, "statuses": collections.Counter(), "crashes": 0, "contract_violations": 0, "hangs": 0,
            "slow": 0, "seconds": 0.0, "max_case_s": 0.0} for n in names
    }
    signal.signal(signal.SIGALRM, _alarm)
    for n in names:  # build the seeds outside the timed cases
        {"parse": T.parse_inputs, "seg": T.seg_seeds, "suv": T.suv_seeds, "sr": T.sr_seeds}[n]()
    t_start = time.perf_counter()
    for i in range(cases):
        target = rng.choices(names, weights=[weights[n] for n in names])[0]
        args = draw(target, rng)
        s = stats[target]
        s["cases"] += 1
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, hang_s)
        outcome, detail = "", ""
        try:
            s["statuses"][T.TARGETS[target](*args)] += 1
        except Hang:
            outcome = "hang"
        except T.ContractViolation as exc:
            outcome, detail = "contract_violation", str(exc)
        except Exception as exc:  # the finding: anything outside the contract
            outcome, detail = "crash", "".join(traceback.format_exception(exc))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        dt = time.perf_counter() - t0
        s["seconds"] += dt
        s["max_case_s"] = max(s["max_case_s"], dt)
        if not outcome and dt > slow_s:  # finished, but slowly: kept to look at (resource use)
            s["slow"] += 1
            (out / f"slow-{target}-{i}.json").write_text(json.dumps(
                {"target": target, "case": i, "seed": seed, "args": _jsonable(args), "seconds": round(dt, 3)}))
        if outcome:
            s[{"hang": "hangs", "contract_violation": "contract_violations", "crash": "crashes"}[outcome]] += 1
            (out / f"{outcome}-{target}-{i}.json").write_text(json.dumps(
                {"target": target, "case": i, "seed": seed, "args": _jsonable(args), "detail": detail}, indent=1))
        if (i + 1) % 1000 == 0:
            print(f"{i + 1} cases, {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
    summary = {
        "cases": cases, "seed": seed, "hang_s": hang_s, "seconds": round(time.perf_counter() - t_start, 1),
        "targets": {n: {**s, "statuses": dict(s["statuses"].most_common()), "seconds": round(s["seconds"], 1),
                        "max_case_s": round(s["max_case_s"], 3)} for n, s in stats.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| target | cases | crashes | contract violations | hangs | slow | max s/case | statuses (count) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, s in summary["targets"].items():
        statuses = ", ".join(f"`{k}` {v}" for k, v in s["statuses"].items())
        lines.append(f"| {name} | {s['cases']} | {s['crashes']} | {s['contract_violations']} | {s['hangs']} "
                     f"| {s['slow']} | {s['max_case_s']} | {statuses} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--hang-s", type=float, default=10.0)
    p.add_argument("--slow-s", type=float, default=2.0, help="keep reproducers of cases slower than this")
    p.add_argument("--weights", default="parse=55,suv=20,sr=15,seg=10")
    p.add_argument("--out", type=Path, default=Path("fuzz-out"))
    p.add_argument("--replay", type=Path, help="run one reproducer file and show its outcome")
    a = p.parse_args(argv)
    logging.disable(logging.WARNING)  # the targets log every refusal; the counts are the output
    warnings.simplefilter("ignore")
    if a.replay:
        case = json.loads(a.replay.read_text())
        print(T.TARGETS[case["target"]](*from_json(case["args"])))
        return 0
    weights = {k: float(v) for k, v in (kv.split("=") for kv in a.weights.split(","))}
    summary = run(a.cases, a.seed, weights, a.hang_s, a.out, a.slow_s)
    print(markdown(summary))
    print(f"\n{summary['cases']} cases, seed {summary['seed']}, {summary['seconds']} s")
    bad = sum(s["crashes"] + s["contract_violations"] + s["hangs"] for s in summary["targets"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
