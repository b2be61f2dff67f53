"""Benchmark of the lesion measurement stage (SEG decode + placement + SUV statistics).

Run:  .venv/bin/python tests/benchmarks/bench_analysis_measure.py [--slices 600] [--lesions 10 50]

A synthetic whole-body PET of 200 x 200 x N voxels (4 x 4 x 3 mm) in float32 with L
spherical lesions (radius 6-20 mm, SUV 3-15 over a background of 1) is segmented by a
highdicom BINARY SEG (one segment per lesion, empty frames omitted).  For each
configuration the script prints the wall time and the peak Python heap (tracemalloc) of

* ``decode``: reading every segment's mask from the SEG (highdicom ``get_volume``);
* ``measure``: placing the masks on the PET grid and computing SUVmax/mean/peak, MTV,
  TLG, bounding box and centroid (:func:`pipelines.dicom.measure.measure_lesions`, with
  the decoded masks cached);

and the ratios that show the cost is linear in the number of lesions and independent of
the volume size (no per-lesion full-volume pass).  It asserts nothing about time.
"""

from __future__ import annotations

import argparse
import io
import time
import tracemalloc

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pipelines.dicom.measure import measure_lesions
from pipelines.dicom.seg import read_segments
from pipelines.dicom.volume import Volume

SPACING = (4.0, 4.0, 3.0)  # i, j, k in mm


def _sources(n_slices: int, rows: int, cols: int, for_uid: str) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    out = []
    for k in range(n_slices):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.128", generate_uid()
        ds.Modality = "PT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Locus", "BENCH", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, for_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "100000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, SPACING[2] * k]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]
        ds.SliceThickness = SPACING[2]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 16
        out.append(ds)
    return out


def phantom(n_lesions: int, n_slices: int, seed: int = 7) -> tuple[Volume, Dataset]:
    rng = np.random.default_rng(seed)
    shape = (n_slices, 200, 200)
    suv = np.ones(shape, np.float32)
    for_uid = generate_uid()
    aff = np.diag([*SPACING, 1.0])
    masks = np.zeros((*shape, n_lesions), np.uint8)  # highdicom wants (frames, rows, cols, segments)
    kk, jj, ii = (np.arange(n) for n in shape)
    for n in range(n_lesions):
        r = rng.uniform(6, 20)
        c = rng.uniform([30, 30, 30], [200 * 4 - 30, 200 * 4 - 30, n_slices * 3 - 30])  # x, y, z mm
        k0, k1 = int((c[2] - r) // 3), int((c[2] + r) // 3) + 2
        j0, j1 = int((c[1] - r) // 4), int((c[1] + r) // 4) + 2
        i0, i1 = int((c[0] - r) // 4), int((c[0] + r) // 4) + 2
        z = (kk[k0:k1] * 3.0 - c[2])[:, None, None]
        y = (jj[j0:j1] * 4.0 - c[1])[None, :, None]
        x = (ii[i0:i1] * 4.0 - c[0])[None, None, :]
        ball = x**2 + y**2 + z**2 <= r**2
        masks[k0:k1, j0:j1, i0:i1, n] |= ball
        suv[k0:k1, j0:j1, i0:i1][ball] = rng.uniform(3, 15)
    descs = [hd.seg.SegmentDescription(
        segment_number=n + 1, segment_label=f"lesion {n + 1}",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n in range(n_lesions)]
    seg = hd.seg.Segmentation(
        source_images=_sources(n_slices, 200, 200, for_uid), pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descs,
        series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="Locus bench", manufacturer_model_name="bench", software_versions="1",
        device_serial_number="1", omit_empty_frames=True)
    buf = io.BytesIO()
    seg.save_as(buf)
    pet = Volume(suv, aff, frame_of_reference_uid=for_uid, series_instance_uid=generate_uid(), modality="PT")
    return pet, pydicom.dcmread(io.BytesIO(buf.getvalue()))


def run(n_lesions: int, n_slices: int) -> dict[str, float]:
    pet, seg_ds = phantom(n_lesions, n_slices)
    seg = read_segments(seg_ds)
    tracemalloc.start()
    t0 = time.perf_counter()
    seg.source_regions()
    t_decode = time.perf_counter() - t0
    _, peak_decode = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    result = measure_lesions(seg, pet)
    t_measure = time.perf_counter() - t0
    _, peak_measure = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(result.lesions) == n_lesions
    voxels = sum(les.measurements.voxel_count for les in result.lesions)
    return {"decode_s": t_decode, "measure_s": t_measure, "decode_peak_mb": peak_decode / 1e6,
            "measure_peak_mb": peak_measure / 1e6, "lesion_voxels": voxels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[300, 600])
    ap.add_argument("--lesions", type=int, nargs="+", default=[10, 50])
    args = ap.parse_args()
    rows = {}
    for s in args.slices:
        for n in args.lesions:
            r = run(n, s)
            rows[(s, n)] = r
            print(f"200x200x{s} PET, {n:3d} lesions ({r['lesion_voxels']:7d} lesion voxels): "
                  f"decode {r['decode_s']:.3f} s (peak {r['decode_peak_mb']:.1f} MB), "
                  f"measure {r['measure_s']:.3f} s (peak {r['measure_peak_mb']:.1f} MB), "
                  f"{1000 * r['measure_s'] / n:.1f} ms/lesion")
    lo, hi = min(args.lesions), max(args.lesions)
    for s in args.slices:
        a, b = rows[(s, lo)], rows[(s, hi)]
        print(f"{s} slices: {hi}/{lo} lesions -> measure time x{b['measure_s'] / a['measure_s']:.2f}, "
              f"lesion voxels x{b['lesion_voxels'] / a['lesion_voxels']:.2f} (linear: ~x{hi / lo:.1f})")
    s0, s1 = min(args.slices), max(args.slices)
    if s0 != s1:
        for n in args.lesions:
            a, b = rows[(s0, n)], rows[(s1, n)]
            print(f"{n} lesions: {s1}/{s0} slices -> measure time x{b['measure_s'] / a['measure_s']:.2f} "
                  f"(volume x{s1 / s0:.1f}; ~x1 expected, cost follows the lesions, not the volume)")


if __name__ == "__main__":
    main()
