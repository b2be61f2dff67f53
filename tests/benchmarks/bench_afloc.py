"""AFLoc per-image cost on CPU (or GPU) and PET MIP rendering time, random weights, published sizes.

Run once: ``PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_afloc.py [--repeats 5] [--device cuda]``

Builds the published architecture offline (ResNet-50 + the three embedders; a BERT-base-sized
text encoder — 12 layers, hidden 768, 12 heads, intermediate 3072, 512 positions — from a local
config and a small vocabulary: the vocabulary size does not change the cost of a forward) and
times, per image:

* ``preprocess``: a 3,000 × 2,500 12-bit MONOCHROME1 radiograph → 8 bits → OpenCV INTER_AREA
  resize-pad → ``[1,3,224,224]``;
* ``image forward``: trunk (224 → 299 upsample) + embedders, once per image (the reference
  re-encodes the image for every prompt; Locus does not);
* ``text 14``: report embeddings of 14 phrases (one batch);
* ``maps 14``: the ``eval/common.py`` recipe (dot product, Gaussian, bilinear 224, min–max) for 14 phrases;
* ``mip``: coronal + sagittal MIP with arg-max depth of a 200 × 200 × 600 float32 PET.

Prints minima and medians over ``--repeats`` rounds and the peak resident set of the process
(``ru_maxrss``; on CUDA also the allocator's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PHRASES = [
    "findings suggesting pneumothorax", "small left pleural effusion", "right lower lobe consolidation",
    "findings suggesting cardiomegaly", "mild pulmonary edema", "left basilar atelectasis",
    "findings suggesting pneumonia", "right upper lobe opacity", "enlarged cardiomediastinum",
    "displaced rib fracture", "support devices in place", "lung lesion in the right apex",
    "bilateral pleural effusions", "pleural thickening on the left",
]  # fmt: skip


def _text_dir(root: Path) -> Path:
    from transformers import BertConfig

    words = sorted({w for p in PHRASES for w in p.split()})
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    BertConfig(vocab_size=len(vocab)).save_pretrained(root)  # BERT-base defaults = Bio_ClinicalBERT sizes
    return root


def _timed(fn, repeats: int) -> tuple[float, float, object]:  # type: ignore[no-untyped-def]
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from pipelines.dicom.volume import Volume
    from pipelines.models.afloc import maps, preprocess
    from pipelines.models.afloc.model import build_model
    from pipelines.render.mip import render_mips

    rng = np.random.default_rng(0)
    _, x = np.mgrid[0:3000, 0:2500] / np.array([3000.0, 2500.0])[:, None, None]
    cr = np.rint(4095 * np.clip(0.6 * np.exp(-((x - 0.5) ** 2) / 0.08) + 0.05 * rng.standard_normal((3000, 2500)), 0, 1))
    cr = cr.astype(np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(_text_dir(Path(tmp))).eval().to(args.device)
        n_params = sum(p.numel() for p in model.parameters())
        rows = []
        pre = _timed(lambda: preprocess.preprocess_dicom_pixels(cr, "MONOCHROME1")[0], args.repeats)
        rows.append(("preprocess 3000x2500 12-bit", pre))
        xin = pre[2].to(args.device)  # type: ignore[union-attr]
        with torch.no_grad():
            model.encode_image(xin)  # warm-up
            img = _timed(lambda: model.encode_image(xin), args.repeats)
            rows.append(("image forward", img))
            txt = _timed(lambda: model.encode_text(PHRASES).report, args.repeats)
            rows.append(("text 14 phrases", txt))
        local = img[2][1].cpu()  # type: ignore[index]
        reports = txt[2].cpu()  # type: ignore[union-attr]
        mp = _timed(lambda: [maps.localization_map(local, reports[i], margin=False) for i in range(14)], args.repeats)
        rows.append(("maps 14 phrases", mp))
    pet = Volume(rng.gamma(2.0, 0.5, (600, 200, 200)).astype(np.float32),
                 np.diag([4.0, 4.0, 3.0, 1.0]), modality="PT")  # fmt: skip
    mip = _timed(lambda: render_mips(pet), args.repeats)
    rows.append(("MIP coronal+sagittal 200x200x600", mip))
    print(f"device={args.device} threads={torch.get_num_threads()} params={n_params:,} load={os.getloadavg()[0]:.1f}")
    for name, (tmin, tmed, _) in rows:
        print(f"{name:36s} min {tmin * 1000:9.1f} ms   median {tmed * 1000:9.1f} ms")
    per_image = sum(r[1][0] for r in rows[:4])
    print(f"{'per image (sum of minima)':36s} {per_image * 1000:9.1f} ms")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.device.startswith("cuda"):
        print(f"CUDA peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
