"""AFLoc image preprocessing, exactly as the published inference path (AFLoc, YH0517/AFLoc 940e3d7: ``eval/utils.py``, ``_resize_img``).

Order: 8-bit grayscale array → resize so the long side is 224 (OpenCV ``INTER_AREA``, size
truncated toward zero) → zero-pad the short side (floor before, ceil after) → three identical
channels → ``ToTensor`` (÷255) → ``Normalize(0.5, 0.5)``, i.e. ``2v/255 − 1``.

The resize calls OpenCV itself (pinned ``opencv-python-headless``): Locus measured
that an area average re-implemented in NumPy differs from OpenCV on exact halves and on
float32 near-halves, and one grey level on 20 pixels moves the maps by 0.022 (``_resize_img``, ``afloc_model.py:370-417``), so
"close" is not good enough here.

Two 8-bit conversions exist upstream and both are provided, named for what they reproduce:

* :func:`dicom_to_uint8` — the repository's only DICOM reader (``eval/utils.py:148-158``):
  stored pixels × 255 / max, absolute value, round-half-even and saturate
  (``cv2.convertScaleAbs``), MONOCHROME1 inverted.  No Modality/VOI LUT.  This is the CR/DX
  step Locus uses and records as :data:`DICOM_TO_UINT8`.
* :func:`png16_to_uint8` — what ``cv2.imread(..., IMREAD_GRAYSCALE)`` does to a 16-bit PNG:
  keep the high byte (``>> 8``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.errors import InputError

#: Input side after resize-pad (``inference.py:30`` overrides ``imsize`` to 224).
IMAGE_SIZE = 224
#: Identifier of the CR/DX → 8-bit step recorded in the model manifest (``eval/utils.py:148-158``).
DICOM_TO_UINT8 = "afloc-eval-utils-dicom: pixel*255/max, |.|, rint, saturate; MONOCHROME1 inverted; no LUTs"
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


def _cv2() -> Any:
    import cv2  # opencv-python-headless, pinned in pyproject (bit-exact INTER_AREA, ``afloc_model.py:370-417``)

    return cv2


def dicom_to_uint8(pixels: np.ndarray, photometric: str = "MONOCHROME2") -> np.ndarray:
    """Stored pixel array → 8-bit, as ``eval/utils.py:148-158``.

    ``convertScaleAbs(x, alpha=255/max(x))`` then ``255 − v`` for MONOCHROME1.  Zero maps to
    zero (no minimum subtraction): reproduced on purpose, it is what the reference does.
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2:
        raise InputError(f"AFLoc needs one grayscale frame, got an array of shape {arr.shape}", code="afloc_not_grayscale")
    if photometric not in PHOTOMETRIC:
        raise InputError(f"AFLoc reads MONOCHROME1/2 only, not {photometric!r}", code="afloc_photometric_unsupported")
    peak = float(arr.max()) if arr.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        raise InputError("image has no positive pixel value (reference scaling divides by the maximum)",
                         code="afloc_blank_image")  # fmt: skip
    cv2 = _cv2()
    src = arr if arr.dtype in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64) else arr.astype(np.float64)
    out = cv2.convertScaleAbs(src, alpha=255.0 / peak)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return np.ascontiguousarray(out, dtype=np.uint8)


def png16_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """16-bit grayscale → 8-bit as OpenCV's grayscale reading of a 16-bit PNG: the high byte."""
    arr = np.asarray(pixels)
    if arr.dtype == np.uint8:
        return arr.copy()
    if arr.dtype != np.uint16:
        raise InputError(f"png16_to_uint8 needs uint16 pixels, got {arr.dtype}", code="afloc_dtype_unsupported")
    return (arr >> 8).astype(np.uint8)


@dataclass(frozen=True)
class Letterbox:
    """Where the source image sits in the 224×224 frame (to undo the pad and scale of ``_resize_img``)."""

    source_rows: int
    source_cols: int
    rows: int  # resized size before padding
    cols: int
    pad_top: int
    pad_left: int

    @property
    def scale(self) -> float:
        """Frame pixels per source pixel along the long side (``224 / max(H, W)``)."""
        return IMAGE_SIZE / max(self.source_rows, self.source_cols)

    def frame_to_source(self, row: float, col: float) -> tuple[float, float]:
        """Continuous frame (row, col) → continuous source (row, col), pixel edges at integers.

        Inverse of the reference's box transfer (``eval/box_transfer.py``: scale by
        ``224 / max(H, W)``, then offset by the pad), so a map region and a ground-truth box
        meet in the same frame.
        """
        return ((row - self.pad_top) / self.scale, (col - self.pad_left) / self.scale)

    def source_to_frame(self, row: float, col: float) -> tuple[float, float]:
        """Continuous source (row, col) → continuous frame (row, col); inverse of :meth:`frame_to_source`."""
        return (row * self.scale + self.pad_top, col * self.scale + self.pad_left)


def resized_shape(rows: int, cols: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """Output (rows, cols) of ``_resize_img`` (``afloc_model.py:370-417``), same float operation order."""
    if rows >= cols:  # ties go here
        return size, int(float(cols) * (size / float(rows)))
    return int(float(rows) * (size / float(cols))), size


def resize_pad(img8: np.ndarray, size: int = IMAGE_SIZE) -> tuple[np.ndarray, Letterbox]:
    """OpenCV ``INTER_AREA`` to the truncated size, then zero pad floor/ceil to ``size``² (``afloc_model.py:370-417``)."""
    arr = np.asarray(img8)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise InputError(f"resize_pad needs a 2-D uint8 array, got {arr.dtype} {arr.shape}", code="afloc_dtype_unsupported")
    h, w = arr.shape
    rows, cols = resized_shape(h, w, size)
    if rows < 1 or cols < 1:
        raise InputError(f"image {h}×{w} is too elongated to resize to {size}", code="afloc_bad_aspect")
    resized = _cv2().resize(arr, (cols, rows), interpolation=_cv2().INTER_AREA)  # dsize is (width, height)
    if h >= w:
        pad = size - cols
        before, after = pad // 2, pad - pad // 2
        out = np.pad(resized, ((0, 0), (before, after)), mode="constant", constant_values=0)
        box = Letterbox(h, w, rows, cols, 0, before)
    else:
        pad = size - rows
        before, after = pad // 2, pad - pad // 2
        out = np.pad(resized, ((before, after), (0, 0)), mode="constant", constant_values=0)
        box = Letterbox(h, w, rows, cols, before, 0)
    return np.ascontiguousarray(out), box


def to_tensor(img224: np.ndarray) -> torch.Tensor:
    """Gray → 3 identical channels, ``ToTensor`` then ``Normalize(0.5, 0.5)`` (``afloc/builder.py:167-223``): ``[1,3,S,S]`` float32.

    Same float32 operations as torchvision (``div(255)``, ``sub(0.5)``, ``div(0.5)``) so the
    result is bit-identical, not just close.
    """
    arr = np.asarray(img224)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise InputError("to_tensor needs a 2-D uint8 array", code="afloc_dtype_unsupported")
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div(255)
    t = t.sub(0.5).div(0.5)
    return t.unsqueeze(0).expand(3, -1, -1).unsqueeze(0).contiguous()


def read_image_file(path: str | Path) -> np.ndarray:
    """``cv2.imread(path, 0)`` as the reference reads PNG/JPEG files (16-bit PNG: high byte, as OpenCV reads it)."""
    p = Path(path)
    img = _cv2().imread(str(p), _cv2().IMREAD_GRAYSCALE)
    if img is None:
        raise InputError(f"cannot read image file {p.name}", code="afloc_image_unreadable")
    return np.ascontiguousarray(img, dtype=np.uint8)


def preprocess_file(path: str | Path) -> tuple[torch.Tensor, Letterbox]:
    """Image file → model input exactly as ``AFLoc.process_img`` at inference (imsize 224, no equalisation)."""
    return preprocess_uint8(read_image_file(path))


def preprocess_uint8(img8: np.ndarray) -> tuple[torch.Tensor, Letterbox]:
    """8-bit grayscale array (the reference's ``cv2.imread`` result) → model input and letterbox."""
    padded, box = resize_pad(img8)
    return to_tensor(padded), box


def preprocess_dicom_pixels(pixels: np.ndarray, photometric: str = "MONOCHROME2") -> tuple[torch.Tensor, Letterbox]:
    """Stored CR/DX pixels → model input through :func:`dicom_to_uint8` (Locus's recorded CR/DX step)."""
    return preprocess_uint8(dicom_to_uint8(pixels, photometric))
