"""Text cleaning, token ids, aggregation, map recipe on hand-made feature maps, zero-shot (YH0517/AFLoc; AFLoc paper)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from library.prompts import PromptSetError
from library.prompts.afloc import load_afloc_prompt_set
from pipelines.errors import ModelError
from pipelines.models.afloc import maps, zeroshot
from pipelines.models.afloc import text as afloc_text


@pytest.mark.parametrize(("raw", "clean"), [
    ("Edema", ""),  # one-word pieces are dropped
    ("Findings suggesting Pneumothorax.", "findings suggesting pneumothorax"),
    ("1. Small left effusion. 2. No pneumothorax.", "small left effusion no pneumothorax"),
    ("size 2.5 cm nodule", "5 cm nodule"),  # the digit-period splitter eats "2." and "size" alone is dropped
    ("café au lait\nspots", "caf au lait spots"),
    ("é x", "x"),  # ≤1-token check happens before non-ASCII removal
    ("Mild\ufffd\ufffdedema here", "mild edema here"),
])  # fmt: skip
def test_clean_prompt(raw: str, clean: str) -> None:
    assert afloc_text.clean_prompt(raw) == clean


def test_token_ids_97_and_wordpiece(afloc_assets: dict[str, Any]) -> None:
    tok = afloc_text.load_tokenizer(afloc_assets["text_dir"])
    vocab = (afloc_assets["text_dir"] / "vocab.txt").read_text().split("\n")
    idx = {w: i for i, w in enumerate(vocab)}
    enc = afloc_text.tokenize(tok, ["Findings suggesting Pneumothorax.", "Edema"])
    ids = enc["input_ids"]
    assert ids.shape == (2, 97) and enc["token_type_ids"].abs().sum() == 0
    expected = [idx[w] for w in ("[CLS]", "findings", "suggesting", "pneumo", "##thorax", "[SEP]")]
    assert ids[0, :6].tolist() == expected and ids[0, 6:].eq(0).all()
    assert ids[1, :2].tolist() == [idx["[CLS]"], idx["[SEP]"]]  # the emptied one-word prompt
    assert enc["attention_mask"][0].sum() == 6
    long = afloc_text.tokenize(tok, [" ".join(["lung opacity"] * 80)])["input_ids"][0]
    assert long[0] == idx["[CLS]"] and long[96] == idx["[SEP]"]  # truncation keeps [CLS] + 95 + [SEP]


def test_aggregation_by_hand() -> None:
    tokens = ["[CLS]", "pneumo", "##thorax", "left", "[SEP]", "[PAD]", "[PAD]"]
    h = torch.arange(4 * 7 * 2, dtype=torch.float32).reshape(4, 7, 2)  # [layers, tokens, D]
    agg, words = afloc_text.aggregate_words(h, tokens)
    assert words == ["[CLS]", "pneumothorax", "left", "[SEP]", "[PAD]", "[PAD]", "[PAD]"]
    assert torch.equal(agg[:, 1], h[:, 1] + h[:, 2]) and torch.equal(agg[:, 3], h[:, 4])
    assert agg[:, 4:].abs().sum() == 0  # zero padding, BERT [PAD] outputs never used
    units = afloc_text.sentence_units(agg[0], words)
    assert torch.equal(units[1], agg[0, 1:3].mean(0)) and torch.equal(units[2], agg[0, 3])
    # Periods: "a . b c . [SEP]": the final period joins the last sentence.
    w2 = ["[CLS]", "a", ".", "b", "c", ".", "[SEP]", "[PAD]"]
    v = torch.arange(16, dtype=torch.float32).reshape(8, 2)
    u = afloc_text.sentence_units(v, w2)
    assert torch.equal(u[1], v[1:2].mean(0)) and torch.equal(u[2], v[3:6].mean(0)) and torch.equal(u[3], v[6])
    assert torch.isnan(afloc_text.sentence_units(v, ["[CLS]", "[SEP]"] + ["[PAD]"] * 6)[1]).all()


def test_model_text_embeddings(afloc_assets: dict[str, Any]) -> None:
    model = afloc_assets["model"]
    with torch.no_grad():
        te = model.encode_text(["findings suggesting pneumothorax", "no edema"])
    assert te.words.shape == (2, 32, 97) and te.sentences.shape == (2, 32, 97) and te.report.shape == (2, 32)
    assert te.word_strings[0][:5] == ["[CLS]", "findings", "suggesting", "pneumothorax", "[SEP]"]
    # report = mean over the 97 word positions (zeros included) = word sum / 97
    torch.testing.assert_close(te.report[0], te.words[0].sum(-1) / 97, rtol=1e-5, atol=1e-6)


def _numpy_gauss_reflect(a: np.ndarray, sigma: float = 1.5, truncate: float = 4.0) -> np.ndarray:
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    def along(m: np.ndarray) -> np.ndarray:
        p = np.concatenate([m[:r][::-1], m, m[-r:][::-1]], axis=0)  # half-sample symmetric: d c b a | a b c d
        return np.stack([np.dot(k, p[i : i + 2 * r + 1]) for i in range(m.shape[0])])
    return along(along(a.astype(np.float64)).T).T


def _numpy_bilinear(a: np.ndarray, size: int) -> np.ndarray:
    n = a.shape[0]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, None)
    i0 = np.minimum(np.floor(src).astype(int), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    f = src - i0
    rows = a[i0] * (1 - f)[:, None] + a[i1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i1] * f[None, :]


def test_map_recipe_on_hand_made_features() -> None:
    d = 8
    t = torch.zeros(d)
    t[2] = 1.0
    local = torch.zeros(d, 19, 19)
    local[2, 5, 12] = 3.0  # one patch matching the phrase
    local[2, 15, 2] = -2.0  # one patch opposing it
    local[5] = torch.randn(19, 19)  # channels the phrase ignores
    raw = maps.raw_map(local, t)
    assert raw.dtype == np.float32 and raw[5, 12] == 3.0 and raw[15, 2] == -2.0 and raw[0, 0] == 0.0
    m = maps.localization_map(local, t, margin=False)
    assert m.shape == (224, 224) and m.dtype == np.float32
    assert np.nanmax(m) == 1.0 and np.nanmin(m) == -1.0
    r, c = np.unravel_index(np.argmax(m), m.shape)
    assert abs((r + 0.5) * 19 / 224 - 0.5 - 5) < 0.6 and abs((c + 0.5) * 19 / 224 - 0.5 - 12) < 0.6
    # Independent float64 re-implementation of the ``eval/common.py`` recipe (reflect Gaussian, half-pixel bilinear, min-max).
    ref = _numpy_bilinear(_numpy_gauss_reflect(raw), 224)
    np.testing.assert_allclose(maps.stored_map(local, t), ref, atol=1e-6)  # unnormalised, as the reference stores it
    ref = (ref - ref.min()) / (ref.max() - ref.min()) * 2 - 1
    np.testing.assert_allclose(m, ref, atol=1e-5)
    mm = maps.localization_map(local, t, margin=True)
    assert np.isnan(mm[:14]).all() and np.isnan(mm[:, -14:]).all() and not np.isnan(mm[14:210, 14:210]).any()
    core = ref[14:210, 14:210]
    np.testing.assert_allclose(mm[14:210, 14:210], (core - core.min()) / (core.max() - core.min()) * 2 - 1, atol=1e-5)
    assert maps.THRESHOLDS[2] == 0.30000000000000004
    masks = maps.masks(mm)
    assert masks[0.1].sum() >= masks[0.5].sum() > 0 and not masks[0.1][:14].any()


def test_border_reflect_matters() -> None:
    """A patch on the edge: reflect mode keeps its mass inside (a zero-padded filter would not)."""
    a = np.zeros((19, 19), np.float32)
    a[0, 0] = 1.0
    s = maps.smooth(a)
    np.testing.assert_allclose(s, _numpy_gauss_reflect(a), atol=1e-7)
    assert abs(float(s.sum()) - 1.0) < 1e-5


def test_flat_map_refused() -> None:
    with pytest.raises(ModelError, match="constant"):
        maps.localization_map(torch.zeros(4, 19, 19), torch.ones(4), margin=False)


def test_prompt_set_and_zero_shot(tmp_path: Path) -> None:
    ps = load_afloc_prompt_set()
    assert ps.version == "afloc-cxr-1" and len(ps.findings) == 13
    for f in ps.findings:
        assert afloc_text.clean_prompt(ps.positive(f)) == ps.positive(f)  # survives the cleaning intact
        assert afloc_text.clean_prompt(ps.negative(f)) == ps.negative(f)
    bad = json.loads(Path("library/prompts/afloc_cxr_v1.json").read_text())
    bad["negative_template"] = "{}"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(PromptSetError, match="two or more words"):
        load_afloc_prompt_set(tmp_path / "bad.json")
    g = torch.tensor([[1.0, 0.0, 0.0]])
    k = len(ps.findings)
    pos = torch.tensor([[1.0, 0.0, 0.0]]).repeat(k, 1)
    neg = torch.tensor([[0.0, 1.0, 0.0]]).repeat(k, 1)
    pos[1] = torch.tensor([0.0, 2.0, 0.0])  # finding 1: the negation matches instead
    scores = zeroshot.paired_scores(g, pos, neg, ps)
    assert scores[0].cos_positive == pytest.approx(1.0) and scores[0].cos_negative == pytest.approx(0.0)
    assert scores[0].probability == pytest.approx(1 / (1 + np.exp(-10.0)))
    assert scores[1].probability == pytest.approx(0.5)
    assert [s.finding_id for s in scores] == ps.ids
    raw = zeroshot.paired_scores(g, pos, neg, ps, rule="raw-dot")  # unnormalised dot, no scale
    assert raw[0].probability == pytest.approx(1 / (1 + np.exp(-1.0)))
    assert raw[1].probability == pytest.approx(0.5)
    with pytest.raises(ValueError):
        zeroshot.paired_scores(g, pos, neg, ps, rule="softmax")
