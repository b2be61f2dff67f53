"""Command line: generate a phantom and write it as a DICOM study.

``python -m training.phantom.cli OUT_DIR --seed 7 --size demo [--seg-on ct] [--scout]``
prints a JSON summary (UIDs, file counts, SUV factor, lesion ground truth) on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from training.phantom.dicom_writer import write_study
from training.phantom.generate import PRESETS, make_phantom


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.phantom.cli", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--lesions", type=int, default=None, help="number of lesions (default: the size's)")
    ap.add_argument("--site", action="append", default=None,
                    help="structure name or library site id for lesions (repeatable; cycled)")
    ap.add_argument("--seg-on", choices=("pet", "ct", "none"), default="pet")
    ap.add_argument("--scout", action="store_true", help="also write a CT localizer in its own frame of reference")
    ap.add_argument("--weight-kg", type=float, default=None)
    ap.add_argument("--dose-bq", type=float, default=None)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    ph = make_phantom(args.seed, args.size, n_lesions=args.lesions, lesion_sites=args.site)
    t1 = time.perf_counter()
    w = write_study(ph, args.out_dir, patient_weight_kg=args.weight_kg, dose_bq=args.dose_bq,
                    seg_on=None if args.seg_on == "none" else args.seg_on, with_scout=args.scout)
    t2 = time.perf_counter()
    summary = {
        "directory": str(w.directory), "study_uid": w.study_uid, "frame_of_reference_uid": w.frame_of_reference_uid,
        "ct_series_uid": w.ct_series_uid, "pet_series_uid": w.pet_series_uid, "seg_series_uid": w.seg_series_uid,
        "files": {"ct": len(w.ct_paths), "pet": len(w.pet_paths), "seg": int(w.seg_path is not None),
                  "scout": len(w.scout_paths)},
        "patient_weight_kg": w.patient_weight_kg, "injected_dose_bq": w.injected_dose_bq,
        "injection_datetime": w.injection_datetime.isoformat(), "series_datetime": w.series_datetime.isoformat(),
        "suv_scale_factor": w.suv_scale_factor,
        "lesions": [{"label": les.label, "site_id": les.site_id, "structure": les.structure,
                     "center_mm": [round(v, 2) for v in les.center_mm], "radii_mm": [round(v, 2) for v in les.radii_mm],
                     "suv": round(les.suv, 3), "kind": les.kind, "volume_ml": round(les.volume_ml, 3),
                     "tracking_uid": les.tracking_uid} for les in ph.lesions],
        "seconds": {"generate": round(t1 - t0, 2), "write": round(t2 - t1, 2)},
    }
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
