"""An independent re-implementation from the published AFLoc code, pinning the acceptance tolerances.

Written from YH0517/AFLoc 940e3d7 alone (``eval/utils.py``, ``_resize_img``, ``vision_model.py``,
``text_model.py``, ``eval/common.py``), not from :mod:`pipelines.models.afloc`:
functional ResNet-50 on the raw state dict, the report embedding in its closed form
``r = (1/97) Σ_{last 4 layers} Σ_{[CLS]…[SEP]} h``, and a float64 NumPy map.  Tolerances are
the ones the equivalence check uses: preprocessed input 1e-6, token ids identical,
embeddings cosine > 0.99999, maps within 1e-4.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.models.afloc import maps, preprocess
from pipelines.models.afloc.checkpoint import read_checkpoint
from pipelines.models.afloc.encoder import AflocConfig, AflocEncoder
from tests.pipelines.afloc.test_preprocess import _radiograph
from tests.pipelines.afloc.test_text_maps import _numpy_bilinear, _numpy_gauss_reflect


def _bn(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                        training=False, eps=1e-5)  # fmt: skip


def _bottleneck(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str, stride: int) -> torch.Tensor:
    out = F.relu(_bn(F.conv2d(x, sd[p + ".conv1.weight"]), sd, p + ".bn1"))
    out = F.relu(_bn(F.conv2d(out, sd[p + ".conv2.weight"], stride=stride, padding=1), sd, p + ".bn2"))  # v1.5: stride here
    out = _bn(F.conv2d(out, sd[p + ".conv3.weight"]), sd, p + ".bn3")
    if p + ".downsample.0.weight" in sd:
        x = _bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride), sd, p + ".downsample.1")
    return F.relu(out + x)


def _reference_image(x: torch.Tensor, sd: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    m = "img_encoder.model."
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=True)
    x = F.max_pool2d(F.relu(_bn(F.conv2d(x, sd[m + "conv1.weight"], stride=2, padding=3), sd, m + "bn1")), 3, 2, 1)
    feats = {}
    for layer, blocks, stride in ((1, 3, 1), (2, 4, 2), (3, 6, 2), (4, 3, 2)):
        for b in range(blocks):
            x = _bottleneck(x, sd, f"{m}layer{layer}.{b}", stride if b == 0 else 1)
        feats[layer] = x
    assert feats[2].shape[-1] == 38 and feats[3].shape[-1] == 19 and feats[4].shape[-1] == 10
    pooled = feats[4].mean(dim=(2, 3))
    g = pooled @ sd["img_encoder.global_embedder.weight"].t() + sd["img_encoder.global_embedder.bias"]
    local = F.conv2d(feats[3], sd["img_encoder.local_embedder.weight"])
    return g, local


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double()))


def test_equivalence_to_the_contract(afloc_assets: dict[str, Any]) -> None:
    enc = AflocEncoder(AflocConfig(afloc_assets["ckpt"], afloc_assets["text_dir"]))
    sd = read_checkpoint(afloc_assets["ckpt"]).state_dict

    # Preprocessing (``eval/utils.py``, ``_resize_img``): published formula on an image resized with an exact factor-2 area mean.
    raw = _radiograph(448, 400, 12, seed=5)
    img8 = np.clip(np.rint(raw.astype(np.float64) * 255.0 / raw.max()), 0, 255).astype(np.uint8)
    x, box = preprocess.preprocess_dicom_pixels(raw, "MONOCHROME2")
    cols = int(400 * (224 / 448))
    assert (box.rows, box.cols) == (224, cols) == (224, 200)
    resized = np.floor(img8.reshape(224, 2, 200, 2).astype(np.float64).mean(axis=(1, 3)) + 0.5)
    v = np.zeros((224, 224))
    v[:, 12 : 12 + 200] = resized
    np.testing.assert_allclose(x[0].numpy(), np.broadcast_to(2 * v / 255 - 1, (3, 224, 224)), atol=1e-6)

    # Image embeddings (``vision_model.py``): functional ResNet-50 from the raw state dict.
    image = enc.encode_image(x)
    with torch.no_grad():
        g_ref, local_ref = _reference_image(x, sd)
    assert _cos(image.global_emb, g_ref) > 0.99999
    for i in range(19):
        for j in (0, 9, 18):
            assert _cos(image.local[0, :, i, j], local_ref[0, :, i, j]) > 0.99999

    # Text (``text_model.py:108-206``): closed form of the report embedding on a BERT built from the same weights.
    from transformers import BertConfig, BertModel, BertTokenizer

    cfg = BertConfig.from_pretrained(str(afloc_assets["text_dir"]))
    cfg._attn_implementation = "eager"
    bert = BertModel(cfg).eval()
    bsd = {k.removeprefix("text_encoder.model."): v for k, v in sd.items() if k.startswith("text_encoder.model.")}
    bert.load_state_dict(bsd, strict=False)
    tok = BertTokenizer(str(afloc_assets["text_dir"] / "vocab.txt"), do_lower_case=True)
    phrases = ["Findings suggesting Pneumothorax.", "small left pleural effusion", "no edema"]
    cleaned = ["findings suggesting pneumothorax", "small left pleural effusion", "no edema"]
    ref_ids = tok(cleaned, padding="max_length", max_length=97, truncation=True, return_tensors="pt")
    from pipelines.models.afloc import text as afloc_text

    ours = afloc_text.tokenize(enc.model.tokenizer, phrases)
    assert torch.equal(ours["input_ids"], ref_ids["input_ids"])  # token ids identical
    with torch.no_grad():
        hs = bert(ref_ids["input_ids"], ref_ids["attention_mask"], ref_ids["token_type_ids"],
                  output_hidden_states=True).hidden_states  # fmt: skip
    reports = enc.report_embeddings(phrases)
    with torch.no_grad():
        single = enc.model.encode_text([phrases[1]]).report[0]
    torch.testing.assert_close(single, reports[1], rtol=1e-5, atol=1e-6)  # batched == one at a time (``process_text``)
    for b in range(len(phrases)):
        sep = int((ref_ids["input_ids"][b] == tok.sep_token_id).nonzero()[0])
        r = sum(h[b, : sep + 1].sum(0) for h in hs[-4:]) / 97
        assert _cos(reports[b], r) > 0.99999
        torch.testing.assert_close(reports[b], r, rtol=1e-4, atol=1e-5)

        # Map (``eval/common.py``) in float64 NumPy from the reference embeddings.
        mref = np.einsum("cij,c->ij", local_ref[0].double().numpy(), r.double().numpy())
        up = _numpy_bilinear(_numpy_gauss_reflect(mref), 224)
        core = up[14:210, 14:210]
        expected = np.full((224, 224), np.nan)
        expected[14:210, 14:210] = (core - core.min()) / (core.max() - core.min()) * 2 - 1
        ours_map = enc.localize(image, [phrases[b]], margin=True)[0]
        np.testing.assert_allclose(ours_map, expected, atol=1e-4, equal_nan=True)
        ours_full = enc.localize(image, [phrases[b]], margin=False)[0]
        assert np.nanmin(ours_full) == -1.0 and np.nanmax(ours_full) == 1.0
    assert maps.MARGIN == 14

    scores = enc.classify(image)
    assert len(scores) == 13 and all(0.0 <= s.probability <= 1.0 for s in scores)
