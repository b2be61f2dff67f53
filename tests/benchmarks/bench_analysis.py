"""Benchmark: analysis of a synthetic whole-body study, per stage, with peak memory.

CT 512x512x600, PET 200x200x600, 50 lesions (the phantom's ``full`` preset), written as
DICOM files, then analysed by :func:`pipelines.analysis.analyse_study` exactly as a worker
does (inventory, volumes, SUV, SEG lesions, SR). Also analyses the same study with only 10
lesions so the lesion-dependent cost can be compared (linear growth expected).

Targets (issue "PET/CT study analysis"): under 30 s and under 3 GB peak on a 2-core machine.

    python tests/benchmarks/bench_analysis.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from pipelines.analysis import analyse_study
from training.phantom.dicom_writer import write_study
from training.phantom.generate import make_phantom


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def run(n_lesions: int, root: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    phantom = make_phantom(2026, "full", n_lesions=n_lesions)
    study = write_study(phantom, root / f"study_{n_lesions}")
    del phantom
    t_write = time.perf_counter() - t0
    result = analyse_study([study.directory])
    assert len(result.lesions) == n_lesions, (len(result.lesions), n_lesions)
    out = dict(result.timings_s)
    out["generate_and_write_s"] = round(t_write, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", type=Path, help="keep the written studies in this directory")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="locus-bench-"))
    try:
        small = run(10, root)
        rss_small = _peak_rss_gb()
        big = run(50, root)
        rss = _peak_rss_gb()
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    stages = ["inventory", "volumes", "suv", "lesions", "report", "total"]
    print("stage        10 lesions   50 lesions")
    for s in stages:
        print(f"{s:<12} {small.get(s, 0):>9.2f} s {big.get(s, 0):>9.2f} s")
    print(f"peak RSS (process, incl. phantom generation): {rss:.2f} GB (after the 10-lesion run: {rss_small:.2f} GB)")
    lesion_cost = (big["lesions"] + big.get("report", 0)) / max(1e-9, small["lesions"] + small.get("report", 0))
    print(f"lesion-dependent stages (lesions + report), 50 vs 10 lesions: x{lesion_cost:.2f} (5.0 = linear)")
    print(f"target: total < 30 s -> {'met' if big['total'] < 30 else 'MISSED'} ({big['total']:.1f} s); "
          f"peak < 3 GB -> {'met' if rss < 3 else 'MISSED'}")


if __name__ == "__main__":
    main()
