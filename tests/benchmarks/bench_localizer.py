"""Localizer benchmark: HCL-AL's per-lesion procedure versus Locus's cached, batched path.

Run:  python tests/benchmarks/bench_localizer.py [--device cuda] [--lesions 50] [--reference-lesions 3]

Both paths use full-size random-weight encoders (coarse ``ClipText_ResidualNet`` at
96x96x128 / 2x2x3 mm, fine at 64³ / 1.5 mm, ViT-B/32 text towers: 108.4M and 79.1M
parameters) and a synthetic vocabulary with the published counts (124 coarse keys, 203
fine words, 387 pairs).  Both start from the same prepared crops, so the timed part is
the model work; the crop cost (SimpleITK resampling + mask selection, identical in both)
is timed and printed separately.

(a) reference procedure, per lesion: rebuild the tokenizer, tokenize and encode all 124
    coarse descriptions, encode the lesion alone, rank; rebuild the tokenizer, encode the
    fine candidates, encode the lesion alone, decide.  On CPU this takes seconds per
    lesion, so only ``--reference-lesions`` are timed and the per-lesion mean is
    extrapolated (the script says so).
(b) Locus: text embeddings computed once at load (timed separately, not per lesion), then
    :meth:`Localizer.decide` on batches of prepared inputs.

Targets (issue): (b) at least 20x faster than (a) on the CPU; on a GPU under 3 ms per
lesion (HCL-AL publishes 34 ms).  No assertion: this prints numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from pipelines.models.checkpoints import HclalCheckpoint, parse_preprocessing
from pipelines.models.localizer import LesionBox, LesionQuery, Localizer
from pipelines.models.localizer import hierarchy as H
from pipelines.models.localizer.encoder3d import init_weights
from pipelines.models.localizer.network import HclalClipNet
from pipelines.models.localizer.vocabulary import Vocabulary
from pipelines.models.text import TextTowerConfig

NORMALIZERS = [
    {"type": 0, "mean": 40, "stddev": 200, "clip": True},
    {"type": 0, "mean": 3, "stddev": 3, "clip": False},
    {"type": 0, "mean": 0, "stddev": 1, "clip": False},
]


def random_checkpoint(crop: tuple[int, int, int], spacing: tuple[float, float, float], seed: int) -> HclalCheckpoint:
    torch.manual_seed(seed)
    cfg = TextTowerConfig(width=512, layers=12, heads=8, context_length=77, vocab_size=49408, output_dim=512)
    net = HclalClipNet("ClipText_ResidualNet", 3, crop, cfg)
    init_weights(net.image_encoder)
    meta = {"spacing": list(spacing), "crop_size": list(crop), "crop_normalizers": NORMALIZERS, "max_stride": 16,
            "interpolation": ["linear", "linear", "nn"], "input_channel": 3, "lesion_idx": [2],
            "sample_method": "fixed_length"}  # fmt: skip
    return HclalCheckpoint(
        path=f"<random seed {seed}>", sha256=f"{seed:064x}", encrypted=False, net="ClipText_ResidualNet",
        preprocessing=parse_preprocessing(meta), state_dict=net.state_dict(),
    )  # fmt: skip


def synthetic_vocabulary() -> Vocabulary:
    """8 regions, 124 coarse keys, 203 fine words, 387 (coarse, fine) pairs, shared fine words."""
    fine_words = [f"structure {i} of the anatomy" for i in range(203)]
    vocab: dict[str, dict[str, dict[str, str]]] = {}
    pairs = 0
    for c in range(124):
        region = vocab.setdefault(f"region {c % 8}", {})
        n = 4 if c < 387 - 3 * 124 else 3
        kids = [fine_words[(c * 3 + k) % 203] for k in range(n)]
        region[f"coarse site {c}"] = {w: f"final site {c}/{w}" for w in kids}
        pairs += n
    assert pairs == 387
    words = [k for r in vocab.values() for k in r] + fine_words
    desc = {w: f"a hypermetabolic lesion located in the {w} seen on whole body pet ct" for w in words}
    return Vocabulary.from_objects(vocab, desc, vocabulary_sha256="0" * 64, descriptions_sha256="0" * 64)


def synthetic_study(n: int) -> tuple[sitk.Image, sitk.Image, sitk.Image, list[LesionQuery]]:
    rng = np.random.default_rng(0)
    ct = sitk.GetImageFromArray(rng.normal(0, 300, (180, 256, 256)).astype(np.float32))
    ct.SetSpacing((1.95, 1.95, 3.0))
    suv = sitk.GetImageFromArray(rng.gamma(2.0, 1.0, (135, 128, 128)).astype(np.float32))
    suv.SetSpacing((4.0, 4.0, 4.0))
    labels = np.zeros((180, 256, 256), dtype=np.float32)
    queries = []
    for i in range(n):
        z, y, x = rng.integers(20, 160), rng.integers(40, 216), rng.integers(40, 216)
        labels[z - 2 : z + 2, y - 3 : y + 3, x - 3 : x + 3] = i + 1
        queries.append((i + 1, (x, y, z)))
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(ct)
    out = []
    for lab, (x, y, z) in queries:
        centre = mask.TransformContinuousIndexToPhysicalPoint((float(x) - 0.5, float(y) - 0.5, float(z) - 0.5))
        out.append(LesionQuery(LesionBox(centre, (6 * 1.95, 6 * 1.95, 4 * 3.0)), mask, label=float(lab)))
    return ct, suv, mask, out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def reference_one(loc: Localizer, coarse_x: torch.Tensor, fine_x: torch.Tensor, box_size) -> str:
    """HCL-AL ``predict_coarse`` + ``predict_fine`` work for one lesion (tokenizer and texts rebuilt)."""
    import open_clip

    dev = loc.device
    vocab = loc.vocab
    tok = open_clip.get_tokenizer("ViT-B-32-quickgelu")  # a fresh SimpleTokenizer, as the reference builds
    texts = [vocab.text(w) for w in vocab.coarse_keys]
    txt = loc.coarse.net.text_encoder(tok(texts).to(dev)).float()
    img = loc.coarse.net.encode_image(coarse_x.to(dev)).float()
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    ranking = H.rank_coarse((100.0 * img @ txt.T).softmax(-1)[0].cpu(), vocab.coarse_keys, 3)
    cands = H.fine_candidates(ranking, vocab)
    tok = open_clip.get_tokenizer("ViT-B-32-quickgelu")
    txt = loc.fine.net.text_encoder(tok([vocab.text(w) for w in cands.words]).to(dev)).float()
    img = loc.fine.net.encode_image(fine_x.to(dev)).float()
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    probs = (100.0 * img @ txt.T).softmax(-1)[0].cpu().tolist()
    return H.decide_fine(cands, probs, ranking, vocab, box_size).pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lesions", type=int, default=50)
    ap.add_argument("--reference-lesions", type=int, default=None, help="default: 2 on CPU, all on GPU")
    ap.add_argument("--end-to-end", action="store_true", help="also time localize_images (crops + model + flags)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    dev = torch.device(args.device)
    n_ref = args.reference_lesions or (args.lesions if dev.type == "cuda" else 2)
    print(f"device {dev}; torch {torch.__version__}; CPU threads {torch.get_num_threads()}")

    t = time.perf_counter()
    coarse = random_checkpoint((96, 96, 128), (2.0, 2.0, 3.0), 1)
    fine = random_checkpoint((64, 64, 64), (1.5, 1.5, 1.5), 2)
    vocab = synthetic_vocabulary()
    print(f"random full-size checkpoints built in {time.perf_counter() - t:.1f} s "
          f"(coarse {sum(v.numel() for k, v in coarse.state_dict.items() if 'running' not in k and 'tracked' not in k):,} params)")  # fmt: skip
    t = time.perf_counter()
    loc = Localizer.from_checkpoints(coarse, fine, vocab, device=dev, batch_size=args.batch_size)
    sync(dev)
    load_s = time.perf_counter() - t
    print(f"(b) load incl. one-off text cache of {len(vocab.coarse_keys)}+{len(vocab.fine_words)} descriptions: {load_s:.1f} s")

    ct, suv, _, queries = synthetic_study(args.lesions)
    t = time.perf_counter()
    prepared = [(loc.stage_input(loc.coarse, ct, suv, q)[0], loc.stage_input(loc.fine, ct, suv, q)[0]) for q in queries]
    crop_ms = 1000 * (time.perf_counter() - t) / len(queries)
    print(f"crops + mask channels (both stages, CPU SimpleITK, same for (a) and (b)): {crop_ms:.1f} ms/lesion")
    coarse_x = torch.from_numpy(np.stack([p[0] for p in prepared]))
    fine_x = torch.from_numpy(np.stack([p[1] for p in prepared]))
    sizes = [q.box.size for q in queries]

    # warm-up (allocator, cuDNN/oneDNN kernel selection) for both paths
    loc.decide(coarse_x[:2], fine_x[:2], sizes[:2])
    if dev.type == "cuda":  # on CPU one reference lesion costs seconds; kernel warm-up is shared anyway
        reference_one(loc, coarse_x[:1], fine_x[:1], sizes[0])
    sync(dev)

    t = time.perf_counter()
    for i in range(n_ref):
        reference_one(loc, coarse_x[i : i + 1], fine_x[i : i + 1], sizes[i])
    sync(dev)
    ref_ms = 1000 * (time.perf_counter() - t) / n_ref
    note = "" if n_ref == args.lesions else f" (timed on {n_ref} lesions, extrapolated to {args.lesions})"
    print(f"(a) reference procedure: {ref_ms:.1f} ms/lesion{note}; {args.lesions} lesions ≈ {ref_ms * args.lesions / 1000:.1f} s")

    t = time.perf_counter()
    decisions = loc.decide(coarse_x, fine_x, sizes)
    sync(dev)
    ours_ms = 1000 * (time.perf_counter() - t) / args.lesions
    assert len(decisions) == args.lesions
    print(f"(b) Locus cached + batched (batch {loc.batch_size}): {ours_ms:.2f} ms/lesion over {args.lesions} lesions")
    ratio = ref_ms / ours_ms
    print(f"speed-up (a)/(b): {ratio:.1f}x   [target ≥ 20x on CPU; GPU target < 3 ms/lesion vs HCL-AL's published 34 ms]")

    e2e_ms = None
    if args.end_to_end:
        t = time.perf_counter()
        loc.localize_images(ct, suv, queries)
        e2e_ms = 1000 * (time.perf_counter() - t) / args.lesions
        print(f"(b) end to end incl. crops and flags: {e2e_ms:.1f} ms/lesion")
    if args.json:
        args.json.write_text(json.dumps({
            "device": str(dev), "lesions": args.lesions, "reference_lesions_timed": n_ref,
            "reference_ms_per_lesion": ref_ms, "locus_ms_per_lesion": ours_ms, "ratio": ratio,
            "crop_ms_per_lesion": crop_ms, "end_to_end_ms_per_lesion": e2e_ms, "load_s": load_s,
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
