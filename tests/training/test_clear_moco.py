"""MoCo v3 + LeCL training step on CPU with a tiny configuration; lesion-centred views."""

from __future__ import annotations

import math

import pytest
import torch

from training.clear.moco import (
    LeclSample,
    MocoConfig,
    MoCoV3,
    crop_resize,
    lesion_view,
    lr_at,
    make_batch,
    make_optimizer,
    momentum_at,
    train_step,
)

TINY = MocoConfig(arch="resnet18", dim=16, mlp_dim=32, temperature=0.2, momentum=0.9, lecl_weight=2.0)


def _samples(n: int = 8, size: int = 48) -> list[LeclSample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        img = torch.rand(3, size, size, generator=g) * 0.2 + 0.1 * (i % 4)
        box = (10.0 + i, 12.0, 18.0 + i, 22.0) if i % 2 == 0 else None
        if box is not None:
            img[:, int(box[0]) : int(box[2]), int(box[1]) : int(box[3])] = 1.0
        out.append(LeclSample(img, box))
    return out


def test_architecture_follows_moco_v3() -> None:
    model = MoCoV3(TINY)
    proj = model.base[1]
    assert isinstance(proj[-1], torch.nn.BatchNorm1d) and not proj[-1].affine  # non-affine BN after the projector
    assert not isinstance(model.predictor[-1], torch.nn.BatchNorm1d)  # ResNet predictor ends without BN
    assert all(not p.requires_grad for p in model.momentum_encoder.parameters())
    assert all(lin.bias is None for lin in proj if isinstance(lin, torch.nn.Linear))
    for pb, pm in zip(model.base.parameters(), model.momentum_encoder.parameters(), strict=True):
        assert torch.equal(pb, pm) and pb.data_ptr() != pm.data_ptr()  # a copy, not shared


def test_momentum_update_precedes_the_keys_and_gets_no_gradient() -> None:
    torch.manual_seed(0)
    model = MoCoV3(TINY)
    with torch.no_grad():  # make base and momentum differ
        for p in model.base.parameters():
            p.add_(0.1)
    base_before = [p.detach().clone() for p in model.base.parameters()]
    mom_before = [p.detach().clone() for p in model.momentum_encoder.parameters()]
    x1, x2, lesion = make_batch(_samples(), torch.Generator().manual_seed(1), 32)
    loss = model(x1, x2, lesion, 0.9)
    loss.backward()
    for b, m0, m1 in zip(base_before, mom_before, model.momentum_encoder.parameters(), strict=True):
        torch.testing.assert_close(m1.detach(), 0.9 * m0 + 0.1 * b)
        assert m1.grad is None
    assert all(p.grad is not None for p in model.predictor.parameters())


def _tiny_backbone() -> torch.nn.Module:
    """A two-conv stand-in for ResNet-18 (same contract: images → [B, 8]); keeps the CPU test short."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def test_training_steps_lower_the_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = MoCoV3(TINY, backbone=_tiny_backbone(), feature_dim=8)
    opt = make_optimizer(model, 1e-3)
    x1, x2, lesion = make_batch(_samples(), torch.Generator().manual_seed(2), 32)
    assert lesion.tolist() == [True, False] * 4
    losses = [train_step(model, opt, x1, x2, lesion, step=s, total_steps=30, base_lr=3e-3, warmup_steps=3)
              for s in range(30)]  # fmt: skip
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05


def test_schedules() -> None:
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)
    assert momentum_at(50, 100, 0.99, cosine=False) == 0.99
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)


def test_lesion_view_is_centred_on_the_lesion_box() -> None:
    img = torch.zeros(3, 64, 64)
    img[:, 40:44, 8:12] = 1.0  # lesion at rows 40-43, cols 8-11 (centre 42, 10)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = lesion_view(img, (40.0, 8.0, 44.0, 12.0), g, 33)
        w = v[0] / v[0].sum()
        idx = torch.arange(33, dtype=torch.float32)
        centroid = (float((w.sum(1) * idx).sum()), float((w.sum(0) * idx).sum()))
        assert centroid == pytest.approx((16.0, 16.0), abs=0.05)  # output pixel 16 is the centre of 0..32
    whole = crop_resize(img, (32.0, 32.0), (64.0, 64.0), 64)
    torch.testing.assert_close(whole, img)  # the whole-slice view is the slice itself at the same size


def test_views_per_sample_kind() -> None:
    x1, x2, lesion = make_batch(_samples(4, 40), torch.Generator().manual_seed(3), 24, augment_views=False)
    assert x1.shape == x2.shape == (4, 3, 24, 24)
    # the lesion-bearing sample's whole-slice view equals the resized slice, unaugmented
    ref = crop_resize(_samples(4, 40)[0].image, (20.0, 20.0), (40.0, 40.0), 24)
    torch.testing.assert_close(x2[0], (ref - 0.5) / 0.25)
    assert lesion.tolist() == [True, False, True, False]


def test_exported_backbone_loads_as_a_registered_encoder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipelines.models.clear.encoder import ClearEncoderSpec, load_encoder
    from pipelines.models.clear.slices import SlicePreprocessing
    from pipelines.models.registry import PinnedFile
    from training.clear.moco import export_encoder

    torch.manual_seed(0)
    model = MoCoV3(TINY)
    pre = SlicePreprocessing(size=32)
    digest = export_encoder(model, tmp_path / "enc.pt", pre, epochs=0)
    enc = load_encoder(ClearEncoderSpec("lecl-test", "resnet18", PinnedFile(str(tmp_path / "enc.pt"), digest), pre))
    imgs = torch.rand(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model.backbone((imgs - 0.5) / 0.25)
    torch.testing.assert_close(torch.from_numpy(enc.embed(imgs.numpy()).astype("float32")), ref, rtol=2e-3, atol=2e-3)


def test_slice_level_lesion_boxes_from_patient_mm() -> None:
    import numpy as np

    from pipelines.models.clear.slices import SliceGrid, SlicePreprocessing, SliceStack
    from training.clear.moco import samples_from_stack

    grid = SliceGrid(x0=-31.0, y0=-31.0, z0=0.0, pixel_mm=2.0, z_spacing_mm=3.0, size=32, n_slices=4)
    stack = SliceStack(np.zeros((4, 3, 32, 32), np.float32), grid, grid.z_of(np.arange(4)), np.arange(4, dtype=np.int32),
                       False, "1", "2", "", SlicePreprocessing(size=32))  # fmt: skip
    boxes = [(-11.0, 1.0, 2.0, -1.0, 9.0, 4.0), (-20.0, -20.0, 5.5, 20.0, 20.0, 7.0)]  # z 2-4 mm; z 5.5-7 mm
    samples = samples_from_stack(stack, boxes)
    assert [s.box is not None for s in samples] == [False, True, True, False]  # z = 0, 3, 6, 9
    # x −11…−1 mm → columns (−11+31)/2+0.5 = 10.5 … 15.5; y 1…9 mm → rows 16.5 … 20.5
    assert samples[1].box == pytest.approx((16.5, 10.5, 20.5, 15.5))
    assert samples[2].box == pytest.approx((6.0, 6.0, 26.0, 26.0))  # ±20 mm → 6.0 … 26.0


def test_pretrain_loop_runs_full_batches_with_lesion_samples() -> None:
    from training.clear.moco import pretrain

    torch.manual_seed(0)
    model = MoCoV3(TINY, backbone=_tiny_backbone(), feature_dim=8)
    losses = pretrain(model, _samples(10), epochs=2, batch_size=4, base_lr=1e-3, out_size=24, warmup_epochs=1)
    assert len(losses) == 2 * (10 // 4) and all(math.isfinite(v) for v in losses)
    with pytest.raises(ValueError):
        pretrain(model, _samples(3), epochs=1, batch_size=4, base_lr=1e-3, out_size=24)
