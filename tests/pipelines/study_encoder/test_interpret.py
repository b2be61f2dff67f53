"""Attention x gradient relevance maps (Chefer et al. 2021) through the HLIP windows.

* the row-vector evaluation equals the literal dense rule ``R ← R + Ā R`` on random windowed
  attention, for a slice/study schedule;
* hand-built attention where the gradient path is known puts relevance exactly on the patches
  of that path, in the block order the rule implies;
* on the tiny random-weight HLIP model: map shape and LPS affine = the preprocessed volume's,
  non-negative, deterministic, flagged like the encoding; NIfTI round trip keeps voxel
  positions (RAS on disk, LPS in memory).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.errors import InputError
from pipelines.models.study_encoder import interpret
from pipelines.models.study_encoder import model as hm
from tests.pipelines.study_encoder.conftest import TINY_MODEL
from tests.pipelines.study_encoder.phantoms import torso


def dense_rule(cams: list[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. 2021 as written: R = I; for each block R = R + Ā R; return R."""
    t = interpret.dense_global_cam(cams[0]).shape[0]
    r = torch.eye(t, dtype=torch.float64)
    for cam in cams:
        r = r + interpret.dense_global_cam(cam) @ r
    return r


def test_row_evaluation_equals_the_dense_rule() -> None:
    gen = torch.Generator().manual_seed(3)
    windows, per_window = 4, 6  # slice blocks: 4 windows of 6 patches; study blocks: 1 window of 24
    schedule = [windows, windows, 1, windows, 1]
    cams = [torch.rand(w, 1 + 24 // w, 1 + 24 // w, generator=gen, dtype=torch.float64) for w in schedule]
    row = interpret.cls_relevance(cams, windows * per_window)
    torch.testing.assert_close(row, dense_rule(cams)[0])


def test_block_cam_keeps_positive_evidence_averaged_over_heads() -> None:
    attention = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]], [[0.2, 0.8], [0.0, 1.0]]]])  # [W=1, heads=2, 2, 2]
    gradient = torch.tensor([[[[2.0, -1.0], [1.0, 3.0]], [[-5.0, 1.0], [4.0, 1.0]]]])
    expected = torch.tensor([[[0.5, 0.4], [0.5, 0.5]]], dtype=torch.float64)  # mean(max(g*a, 0)) over heads
    torch.testing.assert_close(interpret.block_cam(attention, gradient), expected)


def one_hot_cam(windows: int, length: int, entries: list[tuple[int, int, int]]) -> torch.Tensor:
    cam = torch.zeros(windows, length, length, dtype=torch.float64)
    for w, i, j in entries:
        cam[w, i, j] = 1.0
    return cam


def test_known_gradient_path_lands_on_its_patches() -> None:
    """24 patches in 4 slice windows of 6.  Study block: the CLS draws on patch 13 only.
    Slice block: patch 13 (window 2, local 2) draws on patch 14 (window 2, local 3)."""
    study = one_hot_cam(1, 25, [(0, 0, 1 + 13)])
    slice_ = one_hot_cam(4, 7, [(2, 1 + 1, 1 + 2)])  # local row 2 = patch 13, local col 3 = patch 14
    after_slice = interpret.cls_relevance([slice_, study], 24)[1:]  # slice block first, then study block
    assert after_slice.nonzero().flatten().tolist() == [13, 14]
    assert after_slice[13] == after_slice[14] == 1.0
    # the slice block runs after the study block: nothing flows back to patch 14 any more
    study_first = interpret.cls_relevance([study, slice_], 24)[1:]
    assert study_first.nonzero().flatten().tolist() == [13]


def test_cls_copies_are_averaged_like_the_forward_pass() -> None:
    """A slice block whose 4 CLS copies each draw fully on their window's first patch: the
    study CLS row gives each of those patches 1/4 (the copies are averaged going coarser)."""
    slice_ = one_hot_cam(4, 7, [(w, 0, 1) for w in range(4)])
    row = interpret.cls_relevance([slice_], 24)
    assert row[1:].nonzero().flatten().tolist() == [0, 6, 12, 18]
    torch.testing.assert_close(row[[1, 7, 13, 19]], torch.full((4,), 0.25, dtype=torch.float64))


@pytest.fixture(scope="module")
def encoder(tiny_dirs: dict[str, Path]) -> hm.StudyEncoder:
    return hm.StudyEncoder(hm.StudyEncoderConfig(checkpoint=tiny_dirs["checkpoint"], text_dir=tiny_dirs["text"],
                                                 model_name=TINY_MODEL, config_dir=tiny_dirs["configs"]))  # fmt: skip


@pytest.fixture(scope="module")
def chest_ct():  # type: ignore[no-untyped-def]
    return torso(40, 5.0, -100.0, (-60.0, 60.0))


def test_map_geometry_sign_and_determinism(encoder: hm.StudyEncoder, chest_ct) -> None:  # type: ignore[no-untyped-def]
    _, prepared = encoder.prepare(chest_ct)
    first = interpret.relevance_map(encoder, chest_ct, "pleural_effusion")
    again = interpret.relevance_map(encoder, chest_ct, "pleural_effusion")
    vol = first.volume
    assert vol.array.shape == tuple(prepared.tensor.shape[-3:]) == (16, 48, 48)
    assert vol.array.dtype == np.float32 and np.all(vol.array >= 0) and vol.array.max() > 0
    np.testing.assert_array_equal(vol.array, again.volume.array)
    assert first.patch_relevance.shape == (1, 2, 3, 3) and np.all(first.patch_relevance >= 0)
    # first and last voxel centres are the preprocessing crop's, axes are the canonical L, P, S
    np.testing.assert_allclose(vol.index_to_lps(np.array([0, 0, 0]))[0], prepared.crop_lps_min, atol=1e-6)
    np.testing.assert_allclose(vol.index_to_lps(np.array([47, 47, 15]))[0], prepared.crop_lps_max, atol=1e-6)
    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-12)
    # the explained quantity is the finding's paired-prompt decision
    enc = encoder.encode(chest_ct)
    score = next(f.score for f in enc.findings if f.finding == first.finding)
    assert first.score == pytest.approx(score, abs=1e-5)
    assert (first.logit_difference > 0) == (score > 0.5)
    assert {f.code for f in first.flags} == {f.code for f in enc.flags} and first.model == enc.model


def test_unknown_finding_is_refused(encoder: hm.StudyEncoder, chest_ct) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError) as err:
        interpret.relevance_map(encoder, chest_ct, "no_such_finding")
    assert err.value.code == "unknown_finding"


def test_attention_capture_restores_the_fused_path(encoder: hm.StudyEncoder, chest_ct) -> None:  # type: ignore[no-untyped-def]
    interpret.relevance_map(encoder, chest_ct, "emphysema")
    trunk = encoder.model.visual.trunk
    assert all(b.attn.fused_attn for b in trunk.blocks)
    assert all(not b.attn.attn_drop._forward_hooks for b in trunk.blocks)


def test_nifti_round_trip_keeps_orientation(encoder: hm.StudyEncoder, chest_ct, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import nibabel as nib
    import SimpleITK as sitk

    from pipelines.dicom.volume import Volume

    rmap = interpret.relevance_map(encoder, chest_ct, "cardiomegaly")
    path = rmap.to_nifti(tmp_path / "rel.nii.gz")
    back = Volume.from_sitk(sitk.ReadImage(str(path)))
    np.testing.assert_allclose(back.array, rmap.volume.array)
    np.testing.assert_allclose(back.affine, rmap.volume.affine, atol=1e-4)
    img = nib.load(str(path))  # on disk: RAS, array indexed (i, j, k) = (x, y, z)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(img.affine, lps_to_ras @ rmap.volume.affine, atol=1e-4)
    np.testing.assert_allclose(np.asarray(img.dataobj)[5, 7, 3], rmap.volume.array[3, 7, 5])


def test_backward_hooks_equal_gradients_of_every_block(encoder: hm.StudyEncoder, chest_ct) -> None:  # type: ignore[no-untyped-def]
    """The one-pass hook evaluation gives the cams of ``autograd.grad`` w.r.t. every attention."""
    _, prepared = encoder.prepare(chest_ct)
    weights = encoder.classifier.weights[0].clone()

    def forward(cap):  # type: ignore[no-untyped-def]
        emb = encoder.model.encode_image(prepared.tensor, normalize=True)[0]
        logits = encoder.classifier.logit_scale * (weights @ emb)
        return logits[1] - logits[0]

    trunk = encoder.model.visual.trunk
    with interpret.capture_attention(trunk) as cap, torch.enable_grad():
        target = forward(cap)
        grads = torch.autograd.grad(target, cap.attention)
        reference = [interpret.block_cam(a.detach(), g) for a, g in zip(cap.attention, grads, strict=True)]
    with interpret.capture_attention(trunk) as cap, torch.enable_grad():
        hooked = interpret.block_cams_by_backward(forward(cap), cap.attention)
    assert len(hooked) == len(reference) == 3
    for h, r in zip(hooked, reference, strict=True):
        torch.testing.assert_close(h, r)
