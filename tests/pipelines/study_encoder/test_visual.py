"""HLIP trunk: published key layout, hierarchical windows against an independent masked-attention reference."""

from __future__ import annotations

import pytest
import timm
import torch

from pipelines.errors import ModelError
from pipelines.models.study_encoder import visual
from tests.pipelines.study_encoder.conftest import TINY_SPEC, TINY_TRUNK


@pytest.fixture(scope="module")
def tiny_trunk() -> visual.HlipVisionTransformer:
    visual.register_hlip_variant(TINY_TRUNK, TINY_SPEC)
    torch.manual_seed(0)
    trunk = timm.create_model(TINY_TRUNK, pretrained=False).eval()
    with torch.no_grad():
        trunk.cls_token.normal_(0, 1.0)
    return trunk


def test_published_chest_trunk_key_layout() -> None:
    visual.register_published_variants()
    trunk = timm.create_model("vit_base_singlescan_h2_token2744", pretrained=False)
    sd = trunk.state_dict()
    assert tuple(sd["spatial_posemb"].shape) == (1, 14, 14, 14, 768)
    assert tuple(sd["patch_embed.proj.weight"].shape) == (768, 1, 8, 24, 24)
    assert tuple(sd["cls_token"].shape) == (1, 1, 768)
    assert "pos_embed" not in sd and "sequential_posemb" not in sd
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    assert blocks == set(range(12))
    per_block = sorted(k.split(".", 2)[2] for k in sd if k.startswith("blocks.0."))
    assert per_block == sorted(f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                               for p in ("weight", "bias"))  # fmt: skip
    assert {k for k in sd if not k.startswith("blocks.")} == {
        "cls_token", "spatial_posemb", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    # 90.7 M parameters including the frozen 14x14x14x768 position table (hlip-compat §15 reference figure)
    assert sum(p.numel() for p in trunk.parameters()) == 90_703_872
    assert sum(p.numel() for p in trunk.parameters() if p.requires_grad) == 90_703_872 - 14**3 * 768
    assert trunk.levels == ("slice", "slice", "study") * 4


def test_multiscan_variant_has_scan_order_embedding() -> None:
    visual.register_published_variants()
    trunk = timm.create_model("vit_base_multiscan_h2_token588", pretrained=False)
    assert tuple(trunk.state_dict()["sequential_posemb"].shape) == (1, 40, 768)


def test_pretrained_download_refused() -> None:
    visual.register_published_variants()
    with pytest.raises(ModelError) as err:
        timm.create_model("vit_base_singlescan_h2_token2744", pretrained=True)
    assert err.value.code == "pretrained_download_refused"


def test_invalid_schedules_rejected() -> None:
    with pytest.raises(ModelError):
        visual.HlipSpec(img_size=(16, 48, 48), patch_size=(8, 16, 16), embed_dim=96, depth=3,
                        slice_attn_indexes=(0,), study_attn_indexes=(2,))  # block 1 unassigned  # fmt: skip
    with pytest.raises(ModelError):
        visual.HlipSpec(img_size=(16, 48, 48), patch_size=(8, 16, 16), embed_dim=100, depth=1,
                        study_attn_indexes=(0,))  # 100 % 6 != 0  # fmt: skip


def _reference_forward(trunk: visual.HlipVisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Independent formulation: one full sequence with one CLS copy per slab and block-diagonal masks.

    Slice blocks: each slab attends to itself and its own CLS copy.  Study blocks: the CLS
    copies are first averaged into one (the others are ignored), everything attends to everything.
    """
    b = x.shape[0]
    tok = trunk.patch_embed(x)
    _, n, d, h, w, c = tok.shape
    tok = (tok + trunk.spatial_posemb[:, None]).reshape(b, n * d, h * w, c)
    cls = trunk.cls_token.reshape(1, 1, c).expand(b, n * d, c)
    for blk, level in zip(trunk.blocks, trunk.levels, strict=True):
        if level == "slice":
            seq = torch.cat([cls[:, :, None], tok], dim=2)  # [b, nd, 1+hw, c]
            seq = seq.reshape(b * n * d, 1 + h * w, c)
            seq = _block_explicit(blk, seq, None)
            seq = seq.reshape(b, n * d, 1 + h * w, c)
            cls, tok = seq[:, :, 0], seq[:, :, 1:]
        else:
            one = cls.mean(dim=1, keepdim=True)
            seq = torch.cat([one, tok.reshape(b, n * d * h * w, c)], dim=1)
            seq = _block_explicit(blk, seq, None)
            cls = seq[:, :1].expand(b, n * d, c)
            tok = seq[:, 1:].reshape(b, n * d, h * w, c)
    final_cls = cls.mean(dim=1)
    return trunk.norm(final_cls)


def _block_explicit(blk: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A timm ViT block written out with an explicit softmax (no fused attention)."""
    attn = blk.attn
    y = blk.norm1(x)
    bsz, n, c = y.shape
    qkv = attn.qkv(y).reshape(bsz, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    a = (q @ k.transpose(-2, -1)) * (c // attn.num_heads) ** -0.5
    a = a.softmax(dim=-1)
    y = (a @ v).transpose(1, 2).reshape(bsz, n, c)
    x = x + attn.proj(y)
    return x + blk.mlp(blk.norm2(x))


def test_forward_matches_independent_reference(tiny_trunk: visual.HlipVisionTransformer) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 1, 1, 16, 48, 48)
    with torch.no_grad():
        got = tiny_trunk(x)
        ref = _reference_forward(tiny_trunk, x)
    assert got.shape == (2, 96)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_batch_invariance(tiny_trunk: visual.HlipVisionTransformer) -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 1, 1, 16, 48, 48)
    with torch.no_grad():
        whole = tiny_trunk(x)
        parts = torch.cat([tiny_trunk(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(whole, parts, rtol=1e-4, atol=1e-5)


def test_slice_windows_do_not_mix_slabs() -> None:
    """A slice-only trunk: changing slab 1's voxels leaves slab 0's tokens untouched."""
    spec = visual.HlipSpec(img_size=(16, 48, 48), patch_size=(8, 16, 16), embed_dim=96, depth=2, num_heads=4,
                           slice_attn_indexes=(0, 1))  # fmt: skip
    trunk = visual.HlipVisionTransformer(spec).eval()
    torch.manual_seed(3)
    x = torch.randn(1, 1, 1, 16, 48, 48)
    y = x.clone()
    y[..., 8:, :, :] += 1.0  # second depth-patch row only
    with torch.no_grad():
        fx, fy = trunk.forward_features(x), trunk.forward_features(y)
    slab0 = slice(1, 1 + 9)  # tokens of depth row 0 (3 x 3 in-plane patches)
    torch.testing.assert_close(fx[:, slab0], fy[:, slab0])
    assert not torch.allclose(fx[:, 10:], fy[:, 10:])


def test_position_table_resampled_for_other_grid(tiny_trunk: visual.HlipVisionTransformer) -> None:
    x = torch.randn(1, 1, 1, 24, 64, 48)
    with torch.no_grad():
        out = tiny_trunk.forward_features(x)
    assert out.shape == (1, 1 + 3 * 4 * 3, 96)
    with pytest.raises(ModelError):
        tiny_trunk(torch.randn(1, 1, 16, 48, 48))  # 5-D: scan axis missing


def test_flops_estimate_close_to_reference() -> None:
    spec = visual.PUBLISHED_SPECS["vit_base_singlescan_h2_token2744"]
    assert visual.flops_estimate(spec) == pytest.approx(0.59e12, rel=0.1)
