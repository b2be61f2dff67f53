"""HCL-AL's on-disk dataset layout: per-study NIfTI images and the CSV files (HCL-AL, Gao et al. 2025).

Plain values in and out (:class:`~pipelines.dicom.volume.Volume`, dicts, :class:`Box`); no database,
so the node writes this layout and ``training`` reads it without either knowing the other.

Per study folder (the folder name is HCL-AL's study key: its evaluation groups rows by
``basename(dirname(image_path))``):

=================  ========  =================================================================
file               channel   content (HCL-AL, Gao et al. 2025)
=================  ========  =================================================================
``CT.nii.gz``      0         CT in HU on the CT's original grid (column ``image_path``)
``SUV.nii.gz``     1         PET as SUVbw on the PET grid (column ``image_path1``)
``mask.nii.gz``    2         lesion label map, one value per lesion, 0 = background (column
                             ``image_path2``; HCL-AL names its copy ``SEG_MultiLabel.nii.gz``)
=================  ========  =================================================================

Geometry: NIfTI stores RAS; Locus volumes are LPS (DICOM PS3.3 C.7.6.2.1.1).  Files are
written and read with SimpleITK, which converts between the two exactly as HCL-AL's own
SimpleITK reader does, so a voxel keeps its LPS position through a round trip (see the
marker-voxel test).  Sheared (gantry-tilt) grids cannot be stored in NIfTI's orthonormal
qform and are refused.

CSV columns are HCL-AL's exact names (§11).  Boxes are ``x, y, z`` = centre and ``width,
height, depth`` = extent along x, y, z, in world (LPS) millimetres.  ``GT`` is a
comma-separated list of acceptable HCL-AL final strings.  Columns beyond HCL-AL's are
allowed anywhere (HCL-AL passes extra columns through); Locus's own are prefixed ``locus_``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pipelines.dicom.measure import bounding_box_mm
from pipelines.dicom.volume import Volume
from pipelines.errors import InputError

CT_FILENAME = "CT.nii.gz"
SUV_FILENAME = "SUV.nii.gz"
MASK_FILENAME = "mask.nii.gz"
HCLAL_MASK_FILENAME = "SEG_MultiLabel.nii.gz"  # what HCL-AL's own data calls the label map
MASK_FILENAMES = (MASK_FILENAME, HCLAL_MASK_FILENAME)

BBOX_CSV = "bbox.csv"
ANNO_CSV = "anno.csv"
TRAIN_COARSE_CSV = "train_coarse.csv"
TRAIN_FINE_CSV = "train_fine.csv"

IMAGE_COLUMNS = ("image_path", "image_path1", "image_path2")  # CT, SUV, mask (channel order)
BOX_COLUMNS = ("x", "y", "z", "width", "height", "depth")
BBOX_COLUMNS = (*IMAGE_COLUMNS, *BOX_COLUMNS)  # inference input, box mode
ANNO_COLUMNS = ("image_path", *BOX_COLUMNS, "GT")  # evaluation ground truth
TRAIN_COARSE_COLUMNS = (*BBOX_COLUMNS, "coarse_gt")
TRAIN_FINE_COLUMNS = (*BBOX_COLUMNS, "coarse_gt", "fine_gt", "coarse_labels")

GT_SEPARATOR = ","  # HCL-AL splits GT and coarse_labels on commas

# A Locus export adds a manifest (provenance, reviews, skipped studies); HCL-AL ignores it.
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "locus-hclal-dataset"


class DatasetFormatError(InputError):
    """A dataset directory or file does not follow the HCL-AL layout."""

    code = "dataset_format"


# ---------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------
def write_nifti(volume: Volume, path: str | Path, *, dtype: np.dtype | type | None = None) -> Path:
    """Write ``volume`` (LPS, ``[k, j, i]``) as compressed NIfTI; SimpleITK converts LPS to RAS."""
    path = Path(path)
    array = volume.array if dtype is None else volume.array.astype(dtype, copy=False)
    image = volume.with_array(np.ascontiguousarray(array)).to_sitk()  # refuses sheared grids
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def read_nifti(path: str | Path, *, modality: str = "") -> Volume:
    """Read a NIfTI (or any SimpleITK-readable) image as a :class:`Volume` in LPS."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DatasetFormatError(f"cannot read image {path}: {str(exc).strip().splitlines()[-1]}") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetFormatError(f"{path} is not a scalar 3-D image")
    return Volume.from_sitk(image, modality=modality)


def ct_storage_dtype(array: np.ndarray) -> np.dtype:
    """int16 for integral HU within range (CT is integral after Rescale Slope 1), else float32."""
    if not array.size:
        return np.dtype(np.float32)
    if not np.issubdtype(array.dtype, np.integer):
        # slice by slice: a whole-body CT is ~600 MB as float32; no full-size temporaries
        for plane in array:
            if not (np.all(np.isfinite(plane)) and np.array_equal(plane, np.round(plane))):
                return np.dtype(np.float32)
    lo, hi = float(array.min()), float(array.max())
    return np.dtype(np.int16) if lo >= -32768 and hi <= 32767 else np.dtype(np.float32)


def label_dtype(max_label: int) -> np.dtype:
    """The smallest unsigned type that holds every label (HCL-AL's label files use uint8 when they can)."""
    return np.dtype(np.uint8) if max_label <= 255 else np.dtype(np.uint16)


@dataclass(frozen=True)
class StudyImages:
    """The three channel files of one study folder."""

    ct: Path
    suv: Path
    mask: Path

    @property
    def folder(self) -> Path:
        """The study's folder in the layout."""
        return self.ct.parent


def write_study_images(folder: str | Path, *, ct: Volume, suv: Volume, labels: Volume) -> StudyImages:
    """Write ``CT.nii.gz`` (HU), ``SUV.nii.gz`` (float32) and ``mask.nii.gz`` (integer labels)."""
    folder = Path(folder)
    max_label = int(labels.array.max()) if labels.array.size else 0
    if labels.array.size and int(labels.array.min()) < 0:
        raise ValueError("label map values must be >= 0")
    return StudyImages(
        ct=write_nifti(ct, folder / CT_FILENAME, dtype=ct_storage_dtype(ct.array)),
        suv=write_nifti(suv, folder / SUV_FILENAME, dtype=np.float32),
        mask=write_nifti(labels, folder / MASK_FILENAME, dtype=label_dtype(max_label)),
    )


def find_study_images(folder: str | Path) -> StudyImages:
    """The channel files of a study folder by HCL-AL's conventional names (mask: either name)."""
    folder = Path(folder)
    mask = next((folder / n for n in MASK_FILENAMES if (folder / n).is_file()), folder / MASK_FILENAME)
    images = StudyImages(ct=folder / CT_FILENAME, suv=folder / SUV_FILENAME, mask=mask)
    missing = [p.name for p in (images.ct, images.suv, images.mask) if not p.is_file()]
    if missing:
        raise DatasetFormatError(f"study folder {folder} lacks {', '.join(missing)}")
    return images


# ---------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """HCL-AL box: centre ``x, y, z`` and extent ``width, height, depth`` in LPS mm (§11)."""

    centre: tuple[float, float, float]
    size: tuple[float, float, float]

    def as_row(self) -> dict[str, float]:
        """The box as a ``bbox.csv`` row."""
        return dict(zip(BOX_COLUMNS, (*self.centre, *self.size), strict=True))

    @classmethod
    def from_row(cls, row: Mapping[str, str], *, where: str = "") -> Box:
        """A box from a ``bbox.csv`` row; a bad row raises with its location."""
        try:
            v = [float(row[c]) for c in BOX_COLUMNS]
        except (KeyError, ValueError, TypeError) as exc:
            raise DatasetFormatError(f"{where or 'row'}: box columns {BOX_COLUMNS} must be numbers ({exc})") from exc
        if not all(math.isfinite(x) for x in v) or min(v[3:]) < 0:
            raise DatasetFormatError(f"{where or 'row'}: box {v} is not finite with non-negative extent")
        return cls((v[0], v[1], v[2]), (v[3], v[4], v[5]))

    def iou(self, other: Box) -> float:
        """3-D IoU of two axis-aligned boxes (HCL-AL's ``box_iou``)."""
        inter, vol_a, vol_b = 1.0, 1.0, 1.0
        for a, sa, b, sb in zip(self.centre, self.size, other.centre, other.size, strict=True):
            inter *= max(min(a + sa / 2, b + sb / 2) - max(a - sa / 2, b - sb / 2), 0.0)
            vol_a *= sa
            vol_b *= sb
        union = vol_a + vol_b - inter
        return inter / union if union > 0 else 0.0


def voxel_box(affine: np.ndarray, index_min_ijk: Sequence[float], index_max_ijk: Sequence[float]) -> Box:
    """Axis-aligned LPS box of the voxels from ``index_min`` to ``index_max`` (voxel edges).

    The same convention as the analysis's lesion boxes (pipelines.dicom.measure), i.e.
    HCL-AL's corrected box (two box bugs of the HCL-AL reference code not reproduced).
    """
    box = bounding_box_mm(np.asarray(affine), np.asarray(index_min_ijk), np.asarray(index_max_ijk))
    return Box(box.center_mm, box.size_mm)


def label_boxes(labels: Volume) -> dict[int, Box]:
    """Voxel-edge LPS box of every nonzero label of a label map (one pass over the array)."""
    arr = np.asarray(labels.array)
    if not np.issubdtype(arr.dtype, np.integer):
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise DatasetFormatError("the lesion mask holds non-integer values; expected one integer per lesion")
        arr = rounded.astype(np.int64)
    out: dict[int, Box] = {}
    for value, sl in enumerate(ndimage.find_objects(arr.astype(np.int64, copy=False)), start=1):
        if sl is None:
            continue
        k, j, i = sl
        out[value] = voxel_box(labels.affine, (i.start, j.start, k.start), (i.stop - 1, j.stop - 1, k.stop - 1))
    return out


# ---------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------
def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, (np.floating, np.integer)):
        return repr(value.item())
    return str(value)


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, object]],
              *, extra_columns: Sequence[str] = ()) -> int:
    """Write ``rows`` with HCL-AL's ``columns`` first, then ``extra_columns``; returns the row count.

    Every row must carry every column (an HCL-AL reader indexes them by name); keys that
    are not columns are refused so that nothing is dropped silently.
    """
    header = [*columns, *extra_columns]
    if len(set(header)) != len(header):
        raise ValueError(f"duplicate CSV columns in {header}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            missing = [c for c in header if c not in row]
            unknown = [k for k in row if k not in header]
            if missing or unknown:
                raise ValueError(f"{path.name} row {n + 1}: missing columns {missing}, unknown keys {unknown}")
            writer.writerow([_cell(row[c]) for c in header])
            n += 1
    return n


def read_csv(path: str | Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of an HCL-AL CSV as dicts; refuses a file without every ``required`` column."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = list(reader.fieldnames or [])
    except FileNotFoundError as exc:
        raise DatasetFormatError(f"{path} not found") from exc
    missing = [c for c in required if c not in fields]
    if missing:
        raise DatasetFormatError(f"{path} lacks HCL-AL column(s) {missing}; it has {fields}")
    return rows


def join_labels(values: Sequence[str]) -> str:
    """HCL-AL's comma-joined list (``GT``, ``coarse_labels``); a value with a comma cannot be stored."""
    bad = [v for v in values if GT_SEPARATOR in v or not v.strip()]
    if bad:
        raise ValueError(f"HCL-AL list values must be non-empty and free of commas: {bad}")
    return GT_SEPARATOR.join(values)


def split_labels(text: str) -> tuple[str, ...]:
    """Inverse of :func:`join_labels` (surrounding spaces stripped, empty items dropped)."""
    return tuple(v.strip() for v in (text or "").split(GT_SEPARATOR) if v.strip())


def relative_image_path(path: Path, root: Path, *, absolute: bool = False) -> str:
    """A CSV image path: relative to the dataset root (portable), or absolute on request."""
    return str(path.resolve()) if absolute else path.resolve().relative_to(root.resolve()).as_posix()


def resolve_image_path(text: str, root: Path) -> Path:
    """A CSV image path as a file: absolute as given, relative against the dataset root."""
    p = Path(text)
    return p if p.is_absolute() else root / p
