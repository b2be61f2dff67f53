"""End to end: Locus's cached, batched localizer against the reference procedure.

``reference_procedure`` below is a straightforward transcription of the contract
(HCL-AL, Gao et al. 2025) for one lesion at a time: it re-reads both JSON files,
rebuilds the tokenizer and re-encodes every candidate text per lesion, crops with
``ResampleImageFilter`` from a float32 centre, finds the lesion by 26-connected components
and IoU, normalises, transposes to ``[x, y, z]``, and post-processes with the reference
rules.  Only the network weights are shared with Locus (their loading is tested
separately).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from pipelines.dicom.volume import Volume
from pipelines.models.checkpoints import load_checkpoint
from pipelines.models.localizer import LesionQuery, Localizer
from pipelines.models.localizer.lesion_mask import exact_box, reference_box
from pipelines.models.localizer.network import build_network


# -- the reference procedure -----------------------------------------------------------
def _ref_crop(img: sitk.Image, centre, spacing, size, method: str) -> sitk.Image:
    c = np.asarray(centre, dtype=np.float32)
    sp = np.asarray(spacing, dtype=np.float32)
    sz = np.asarray(size, dtype=np.int32)
    ref = sitk.Image(int(sz[0]), int(sz[1]), int(sz[2]), img.GetPixelID())
    ref.SetSpacing(sp.tolist())
    r = sitk.ResampleImageFilter()
    r.SetReferenceImage(ref)
    r.SetOutputOrigin([c[i] - (sz[i] * sp[i] / 2) for i in range(3)])
    r.SetInterpolator(sitk.sitkNearestNeighbor if method == "nn" else sitk.sitkLinear)
    r.SetDefaultPixelValue(0)
    return r.Execute(img)


def _ref_box(img: sitk.Image, value) -> np.ndarray:
    a = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
    idx = np.argwhere(a == value)
    lo, hi = idx.min(0), idx.max(0)
    o, s = np.array(img.GetOrigin()), np.array(img.GetSpacing())
    d = np.array(img.GetDirection()).reshape(3, 3)
    start = o + d @ (lo * s)
    size = np.abs(o + d @ ((hi + 1) * s) - start)
    return np.concatenate(((start + start + size) / 2, size))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    lo = np.maximum(a[:3] - a[3:] / 2, b[:3] - b[3:] / 2)
    hi = np.minimum(a[:3] + a[3:] / 2, b[:3] + b[3:] / 2)
    inter = float(np.prod(np.maximum(hi - lo, 0)))
    return 0.0 if inter == 0 else inter / (float(np.prod(a[3:])) + float(np.prod(b[3:])) - inter)


def _ref_inputs(ckpt, images, box: np.ndarray) -> torch.Tensor:
    crops = [_ref_crop(im, box[:3], ckpt.preprocessing.spacing, ckpt.preprocessing.crop_size, m)
             for im, m in zip(images, ckpt.preprocessing.interpolation)]  # fmt: skip
    cc, _ = ndimage.label(sitk.GetArrayFromImage(crops[2]).astype(np.int32), structure=np.ones((3, 3, 3)))
    cc_img = sitk.GetImageFromArray(cc.astype(np.int32))
    cc_img.CopyInformation(crops[2])
    best, best_iou = 0, 0.0
    for lab in [v for v in np.unique(cc) if v]:
        iou = _iou(box, _ref_box(cc_img, lab))
        if iou > best_iou:
            best, best_iou = lab, iou
    assert best, "the golden scenes only contain lesions that match at model resolution"
    arrays = [sitk.GetArrayFromImage(crops[0]), sitk.GetArrayFromImage(crops[1]), (cc == best).astype(np.int32)]
    out = []
    for a, n in zip(arrays, ckpt.preprocessing.normalizers):
        v = (a.astype(np.float32) - n.mean) / (n.stddev + 1e-8)
        out.append(np.transpose(np.clip(v, -1, 1) if n.clip else v, (2, 1, 0)))
    return torch.stack([torch.from_numpy(np.ascontiguousarray(o)) for o in out]).unsqueeze(0)


def _ref_classify(net, x: torch.Tensor, texts: list[str]) -> torch.Tensor:
    import open_clip

    tokens = open_clip.get_tokenizer("ViT-B-32-quickgelu")(texts)  # rebuilt per call, as the reference does
    with torch.no_grad():
        img = net.encode_image(x).float()
        txt = net.text_encoder(tokens).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (100.0 * img @ txt.T).softmax(dim=-1)[0]


def reference_procedure(nets, ckpts, vocab_paths, images, box: np.ndarray) -> dict[str, str]:
    vocab = json.loads(Path(vocab_paths[0]).read_text(encoding="utf-8"))
    desc = json.loads(Path(vocab_paths[1]).read_text(encoding="utf-8"))
    rev = {v: k for k, v in desc.items()}
    # coarse
    words = list(dict.fromkeys(c for region in vocab.values() for c in region))
    texts = [desc[w] for w in words]
    probs, order = _ref_classify(nets[0], _ref_inputs(ckpts[0], images, box), texts).topk(len(texts))
    ranked = [(rev[texts[int(i)]], float(p)) for p, i in zip(probs, order) if float(p) != 0][:3]
    # fine
    fine, parent, parent_p = [], [], []
    for c, p in ranked:
        for region in vocab.values():
            for f in region.get(c, {}):
                if f not in fine:
                    fine.append(f)
                    parent.append(c)
                    parent_p.append(p)
    fp = _ref_classify(nets[1], _ref_inputs(ckpts[1], images, box), [desc[f] for f in fine]).tolist()
    order = list(np.argsort(-np.array(fp)))
    parent = [parent[i] for i in order]
    fine = [fine[i] for i in order]
    fp = [fp[i] for i in order]
    all_parents: dict[str, list[str]] = {}
    for region in vocab.values():
        for c, kids in region.items():
            for f in kids:
                all_parents.setdefault(f, []).append(c)
    to_coarse = [next((c for c in parent if c in all_parents[f]), all_parents[f][0]) for f in fine]
    keep = [i for i, p in enumerate(fp) if p != 0]
    fine, fp, to_coarse = [fine[i] for i in keep], [fp[i] for i in keep], [to_coarse[i] for i in keep]
    if min(box[3:]) > 100:
        pred = ranked[0][0]
    else:
        pred = next(r[to_coarse[0]][fine[0]] for r in vocab.values() if to_coarse[0] in r)
    return {
        "coarse_labels": ",".join(c for c, _ in ranked),
        "coarse_probs": ",".join(str(p) for _, p in ranked),
        "fine_to_coarse_labels": ",".join(to_coarse),
        "fine_labels": ",".join(fine),
        "fine_probs": ",".join(str(p) for p in fp),
        "pred": pred,
    }


# -- a synthetic study -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict:
    rng = np.random.default_rng(3)
    shape = (50, 90, 100)  # z, y, x on the CT grid (1.5 x 1.5 x 3 mm)
    ct = sitk.GetImageFromArray(rng.normal(20, 150, shape).astype(np.float32))
    ct.SetSpacing((1.5, 1.5, 3.0))
    ct.SetOrigin((-75.2, -60.4, -70.1))
    suv = sitk.GetImageFromArray(rng.gamma(2.0, 1.0, (40, 36, 40)).astype(np.float32))
    suv.SetSpacing((4.0, 4.0, 4.0))
    suv.SetOrigin((-80.0, -70.0, -75.0))
    labels = np.zeros(shape, dtype=np.float32)
    labels[20:24, 40:46, 30:36] = 1
    labels[20:24, 40:46, 36:40] = 2  # touches lesion 1
    labels[8:12, 10:15, 70:76] = 3
    labels[2:40, 15:85, 10:85] = np.where(labels[2:40, 15:85, 10:85] == 0, 4, labels[2:40, 15:85, 10:85])  # >100 mm
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(ct)
    out = tmp_path_factory.mktemp("scene")
    paths = {}
    for name, img in (("CT", ct), ("SUV", suv), ("SEG_MultiLabel", mask)):
        paths[name] = out / f"{name}.nii.gz"
        sitk.WriteImage(img, str(paths[name]))
    # the NIfTI round trip keeps float32 values and the LPS geometry (SimpleITK converts RAS on write/read)
    images = [sitk.ReadImage(str(paths[n]), sitk.sitkFloat32) for n in ("CT", "SUV", "SEG_MultiLabel")]
    return {"images": images, "paths": paths, "labels": labels, "dir": out}


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> tuple[list, list]:
    ckpts = [load_checkpoint(model_dir / "coarse"), load_checkpoint(model_dir / "fine")]  # fine == fine_enc
    return [build_network(c) for c in ckpts], ckpts


def _assert_rows_equal(ours: dict[str, str], ref: dict[str, str]) -> None:
    for key in ("coarse_labels", "fine_to_coarse_labels", "fine_labels", "pred"):
        assert ours[key] == ref[key], key
    for key in ("coarse_probs", "fine_probs"):
        a = np.array([float(v) for v in ours[key].split(",")])
        b = np.array([float(v) for v in ref[key].split(",")])
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_hclal_mode_matches_reference_procedure(localizers, reference, vocab_paths, scene) -> None:
    images = scene["images"]
    boxes = [reference_box(images[2], lab) for lab in (1, 2, 3, 4)]
    outs = localizers["hcl-al"].localize_images(images[0], images[1], [LesionQuery(b, images[2]) for b in boxes])
    for box, out in zip(boxes, outs):
        ref = reference_procedure(*reference, vocab_paths, images, box.as_array())
        _assert_rows_equal(out.hclal_columns(), ref)
    assert outs[3].large_lesion and outs[3].final_label == outs[3].coarse_ranking[0].label
    assert "large_lesion" in {f.code for f in outs[3].flags}
    assert not any(o.large_lesion for o in outs[:3])
    for o in outs:
        assert o.geometry_mode == "hcl-al" and o.calibrated_probability is None
        assert o.model.sha256 == localizers["hcl-al"].spec.weights_sha256
        assert 1 <= len(o.alternatives) <= 3 and o.alternatives[0].label == o.final_label


def test_batch_invariance(model_dir: Path, vocab_paths, scene) -> None:
    images = scene["images"]
    queries = [LesionQuery(reference_box(images[2], lab), images[2]) for lab in (1, 3, 4)]
    kw = {"geometry_mode": "hcl-al"}
    one = Localizer.load(model_dir / "coarse", model_dir / "fine", *vocab_paths, batch_size=1, **kw)
    many = Localizer.load(model_dir / "coarse", model_dir / "fine", *vocab_paths, batch_size=3, **kw)
    for a, b in zip(one.localize_images(images[0], images[1], queries), many.localize_images(images[0], images[1], queries)):
        _assert_rows_equal(a.hclal_columns(), b.hclal_columns())


def test_volume_api_in_both_modes(localizers, scene) -> None:
    ct_img, suv_img, mask_img = scene["images"]
    ct, suv = Volume.from_sitk(ct_img), Volume.from_sitk(suv_img)
    grid = Volume.from_sitk(mask_img)
    masks = [scene["labels"] == lab for lab in (1, 3)]
    compat = localizers["hcl-al"].localize(ct, suv, masks, mask_grid=grid)
    direct = localizers["hcl-al"].localize_images(
        ct_img, suv_img, [LesionQuery(reference_box(mask_img, lab), mask_img) for lab in (1, 3)]
    )
    for a, b in zip(compat, direct):
        # the composite holds only lesions 1 and 3, so lesion 2 no longer merges with 1 (touching)
        assert a.box == b.box
    corrected = localizers["corrected"].localize(ct, suv, masks, mask_grid=grid)
    for out, lab in zip(corrected, (1, 3)):
        assert out.box == exact_box(mask_img, lab)
        assert out.geometry_mode == "corrected" and not out.mask_missing
        np.testing.assert_allclose(np.array(compat[[1, 3].index(lab)].box.centre) - out.box.centre,
                                   np.array(mask_img.GetSpacing()) / 2)  # B1  # fmt: skip
    loc = corrected[0].to_localization()
    assert loc.final_label == corrected[0].final_label and loc.site is None


def test_calibrated_probability_only_with_temperatures(model_dir: Path, vocab_paths, scene) -> None:
    images = scene["images"]
    loc = Localizer.load(model_dir / "coarse", model_dir / "fine", *vocab_paths, temperatures=(0.05, 0.05))
    out = loc.localize_images(images[0], images[1], [LesionQuery(exact_box(images[2], 3), images[2], label=3)])[0]
    assert out.calibrated_probability is not None and 0 < out.calibrated_probability <= 1


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


def test_cli_box_and_mask_modes_write_reference_columns(model_dir: Path, vocab_paths, scene, reference) -> None:
    from click.testing import CliRunner

    from node.cli_localize import localize

    p, out_dir = scene["paths"], scene["dir"]
    mask_img = scene["images"][2]
    boxes = [reference_box(mask_img, lab) for lab in (1, 3)]
    with open(out_dir / "bbox.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_path", "image_path1", "image_path2", "x", "y", "z", "width", "height", "depth", "lesion"])
        for i, b in enumerate(boxes):
            w.writerow([p["CT"], p["SUV"], p["SEG_MultiLabel"], *map(repr, (*b.centre, *b.size)), f"L{i}"])
    common = ["--coarse", str(model_dir / "coarse"), "--fine", str(model_dir / "fine"), "--vocabulary",
              str(vocab_paths[0]), "--descriptions", str(vocab_paths[1]), "--geometry-mode", "hcl-al"]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(localize, ["--input-csv", str(out_dir / "bbox.csv"), "-o", str(out_dir / "box_pred.csv"), *common])
    assert res.exit_code == 0, res.output
    fields, rows = _read(out_dir / "box_pred.csv")
    assert fields == ["image_path", "image_path1", "image_path2", "x", "y", "z", "width", "height", "depth", "lesion",
                      "coarse_labels", "coarse_probs", "fine_to_coarse_labels", "fine_labels", "fine_probs", "pred"]  # fmt: skip
    assert [r["lesion"] for r in rows] == ["L0", "L1"]
    for b, row in zip(boxes, rows):
        _assert_rows_equal(row, reference_procedure(*reference, vocab_paths, scene["images"], b.as_array()))

    res = runner.invoke(localize, ["--ct", str(p["CT"]), "--suv", str(p["SUV"]), "--mask", str(p["SEG_MultiLabel"]),
                                   "-o", str(out_dir / "mask_pred.csv"), "--with-flags", *common])  # fmt: skip
    assert res.exit_code == 0, res.output
    fields, rows = _read(out_dir / "mask_pred.csv")
    assert fields[:10] == ["class", "image_path", "image_path1", "image_path2", "x", "y", "z", "width", "height", "depth"]
    assert fields[-3:] == ["locus_flags", "locus_model_id", "locus_model_sha256"]
    # 26-connected components of all nonzero voxels: the big lesion 4 encloses 1, 2 and 3 → one component
    _cc, n = ndimage.label(scene["labels"] > 0, structure=np.ones((3, 3, 3)))
    assert len(rows) == n
    assert all(r["class"] == "bbox" for r in rows)
    assert "large_lesion" in rows[0]["locus_flags"]

    res = runner.invoke(localize, ["--ct", str(p["CT"]), "--suv", str(p["SUV"]), "--mask", str(p["SEG_MultiLabel"]),
                                   *common[:-1], "corrected"])  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("bbox,")]
    assert len(lines) == 4  # corrected mask mode: one lesion per label value


def test_cli_boxes_option_in_corrected_mode(model_dir: Path, vocab_paths, scene) -> None:
    """--boxes with corrected geometry: each box is tied to the label whose exact box overlaps it most."""
    from click.testing import CliRunner

    from node.cli_localize import localize

    p, out_dir = scene["paths"], scene["dir"]
    mask_img = scene["images"][2]
    with open(out_dir / "boxes.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "y", "z", "width", "height", "depth"])
        w.writerow([*exact_box(mask_img, 3).centre, *exact_box(mask_img, 3).size])
        w.writerow([500.0, 500.0, 500.0, 5.0, 5.0, 5.0])  # matches no lesion
    res = CliRunner().invoke(localize, [
        "--ct", str(p["CT"]), "--suv", str(p["SUV"]), "--mask", str(p["SEG_MultiLabel"]), "--boxes",
        str(out_dir / "boxes.csv"), "--coarse", str(model_dir / "coarse"), "--fine", str(model_dir / "fine"),
        "--vocabulary", str(vocab_paths[0]), "--descriptions", str(vocab_paths[1]), "--with-flags",
        "-o", str(out_dir / "corrected_pred.csv"),
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    _, rows = _read(out_dir / "corrected_pred.csv")
    assert len(rows) == 2 and rows[0]["image_path2"] == str(p["SEG_MultiLabel"])
    assert "mask_missing" not in rows[0]["locus_flags"]
    assert "mask_missing" in rows[1]["locus_flags"] and "crop_outside_scan" in rows[1]["locus_flags"]
    assert rows[0]["pred"] and rows[1]["pred"]
