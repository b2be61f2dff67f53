"""Preprocessing on synthetic radiographs (YH0517/AFLoc ``eval/utils.py``, ``_resize_img``): 8/12/16-bit, MONOCHROME1, resize-pad."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.errors import InputError
from pipelines.models.afloc import preprocess as pp


def _radiograph(rows: int, cols: int, bits: int, seed: int = 0) -> np.ndarray:
    """Smooth chest-like field (bright mediastinum, dark lungs) plus noise, in ``bits`` stored bits."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols] / np.array([rows, cols])[:, None, None]
    body = np.exp(-((x - 0.5) ** 2) / 0.08) * 0.6 + 0.3 * np.exp(-((y - 0.3) ** 2) / 0.2)
    img = body + 0.05 * rng.standard_normal((rows, cols))
    img = np.clip(img / img.max(), 0, 1) * (2**bits - 1)
    return np.rint(img).astype(np.uint8 if bits == 8 else np.uint16)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_dicom_to_uint8_is_the_reference_scaling(bits: int) -> None:
    x = _radiograph(64, 48, bits)
    expected = np.clip(np.rint(np.abs(x.astype(np.float64) * (255.0 / x.max()))), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(pp.dicom_to_uint8(x, "MONOCHROME2"), expected)
    np.testing.assert_array_equal(pp.dicom_to_uint8(x, "MONOCHROME1"), 255 - expected)  # inverted
    assert pp.dicom_to_uint8(np.array([[0, 4095]], np.uint16)).tolist() == [[0, 255]]  # no minimum subtraction


def test_monochrome1_inversion_makes_bone_bright() -> None:
    x = _radiograph(40, 40, 12)
    mono1 = x.max() - x  # the same scene stored as MONOCHROME1 (bright = low values)
    a = pp.dicom_to_uint8(x, "MONOCHROME2").astype(int)
    b = pp.dicom_to_uint8(mono1, "MONOCHROME1").astype(int)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99  # same polarity after inversion


def test_png16_keeps_the_high_byte() -> None:
    x = np.array([[0, 255, 256, 65535, 0x1234]], np.uint16)
    assert pp.png16_to_uint8(x).tolist() == [[0, 0, 1, 255, 0x12]]


def test_bad_inputs_refused() -> None:
    with pytest.raises(InputError, match="no positive pixel"):
        pp.dicom_to_uint8(np.zeros((4, 4), np.uint16))
    with pytest.raises(InputError, match="grayscale"):
        pp.dicom_to_uint8(np.ones((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="MONOCHROME"):
        pp.dicom_to_uint8(np.ones((4, 4), np.uint8), "RGB")


@pytest.mark.parametrize(("shape", "expected"), [((3056, 2544), (224, 186)), ((2544, 3056), (186, 224)),
                                                  ((300, 200), (224, 149)), ((512, 512), (224, 224))])  # fmt: skip
def test_resized_shape_truncates(shape: tuple[int, int], expected: tuple[int, int]) -> None:
    assert pp.resized_shape(*shape) == expected


def _area_mean(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Independent float64 area average (each output pixel = overlap-weighted mean of its source footprint)."""
    def weights(n_in: int, n_out: int) -> np.ndarray:
        w = np.zeros((n_out, n_in))
        scale = n_in / n_out
        for o in range(n_out):
            lo, hi = o * scale, (o + 1) * scale
            for i in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
                w[o, i] = max(0.0, min(hi, i + 1) - max(lo, i))
        return w / scale

    return weights(img.shape[0], rows) @ img.astype(np.float64) @ weights(img.shape[1], cols).T


def test_inter_area_factor_2_and_4_exact() -> None:
    """Exact factors: OpenCV rounds halves up at ×2 and to even at ×4 (measured)."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (448, 448), dtype=np.uint8)
    out, box = pp.resize_pad(img)
    assert box.pad_left == 0 and box.pad_top == 0
    np.testing.assert_array_equal(out, np.floor(_area_mean(img, 224, 224) + 0.5).astype(np.uint8))
    img4 = rng.integers(0, 256, (896, 896), dtype=np.uint8)
    out4, _ = pp.resize_pad(img4)
    np.testing.assert_array_equal(out4, np.rint(_area_mean(img4, 224, 224)).astype(np.uint8))


def test_inter_area_non_integer_factor_on_a_radiograph() -> None:
    img = pp.dicom_to_uint8(_radiograph(560, 600, 12, seed=2))  # factor 600/224 = 2.68
    out, box = pp.resize_pad(img)
    rows, cols = box.rows, box.cols
    assert (rows, cols) == (int(560 * (224 / 600)), 224) == (209, 224)
    assert (box.pad_top, 224 - rows - box.pad_top) == (7, 8)  # floor before, ceil after
    ref = np.rint(_area_mean(img, rows, cols)).astype(np.uint8)
    core = out[box.pad_top : box.pad_top + rows]
    diff = np.abs(core.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # only float32 near-half ties may differ
    assert (out[: box.pad_top] == 0).all() and (out[box.pad_top + rows :] == 0).all()


def test_pad_left_right_for_portrait_and_tensor() -> None:
    img = np.full((300, 200), 200, np.uint8)
    x, box = pp.preprocess_uint8(img)
    assert (box.cols, box.pad_left) == (149, 37)  # pad 75: 37 before, 38 after
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 1], x[0, 2])
    assert float(x[0, 0, 100, 0]) == -1.0 and float(x[0, 0, 100, 223]) == -1.0  # zero pad -> -1
    assert abs(float(x[0, 0, 100, 100]) - (2 * 200 / 255 - 1)) < 1e-6
    assert box.frame_to_source(0, 37) == (0.0, 0.0)
    r, c = box.frame_to_source(*box.source_to_frame(123.0, 45.0))
    assert abs(r - 123.0) < 1e-9 and abs(c - 45.0) < 1e-9


def test_png_files_read_like_the_reference(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import cv2

    x16 = _radiograph(300, 260, 16, seed=4)
    cv2.imwrite(str(tmp_path / "r16.png"), x16)
    np.testing.assert_array_equal(pp.read_image_file(tmp_path / "r16.png"), (x16 >> 8).astype(np.uint8))
    x8 = _radiograph(300, 260, 8, seed=4)
    cv2.imwrite(str(tmp_path / "r8.png"), x8)
    t, box = pp.preprocess_file(tmp_path / "r8.png")
    t2, _ = pp.preprocess_uint8(x8)
    assert torch.equal(t, t2) and box.cols == int(260 * (224 / 300))
    with pytest.raises(InputError, match="cannot read"):
        pp.read_image_file(tmp_path / "missing.png")


def test_to_tensor_is_two_v_over_255_minus_one() -> None:
    v = np.arange(256, dtype=np.uint8).reshape(16, 16)
    t = pp.to_tensor(np.tile(v, (14, 14)))
    np.testing.assert_allclose(t[0, 0, :16, :16].numpy(), 2 * v.astype(np.float64) / 255 - 1, atol=1e-6)
