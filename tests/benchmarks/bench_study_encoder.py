"""Time per study of the full-size HLIP chest-CT encoder (random weights), CPU or GPU.

Run once: ``PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_study_encoder.py [--device cuda] [--slices 300]``

Builds ``vit_base_singlescan_h2_token2744`` through open_clip (text tower: a small local BERT
config, which does not affect per-study image cost), writes and strictly loads a checkpoint
in the published layout, then encodes a synthetic whole-body CT (512 x 512, 0.98 mm, 3 mm
slices) and prints preprocessing / forward / zero-shot times and peak memory.  HLIP's README
quotes ~0.1 s per study end to end on GPU (HLIP, arXiv 2505.21862).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def phantom(n_slices: int, n: int = 512, dxy: float = 0.98, dz: float = 3.0):  # type: ignore[no-untyped-def]
    from pipelines.dicom.volume import Volume

    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    x = (x - n / 2) * dxy
    y = (y - n / 2) * dxy
    body = (x / 170) ** 2 + (y / 120) ** 2 <= 1
    arr = np.full((n_slices, n, n), -1000.0, np.float32)
    z = np.arange(n_slices) * dz - n_slices * dz * 0.75  # lungs in the upper quarter
    for k, zk in enumerate(z):
        sl = arr[k]
        sl[body] = 40.0
        t = 1 - ((zk - 100) / 130) ** 2
        if t > 0:
            for cx in (-70.0, 70.0):
                sl[((x - cx) / 55) ** 2 + ((y + 10) / 70) ** 2 <= t] = -850.0
    aff = np.diag([dxy, dxy, dz, 1.0])
    aff[:3, 3] = (-n / 2 * dxy, -n / 2 * dxy, z[0])
    return Volume(arr, aff, series_instance_uid="1.2.3", modality="CT")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--relevance", action="store_true",
                    help="also time one attention x gradient relevance map (explicit attention + backward)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipelines.models.study_encoder import model as hm
    from tests.pipelines.study_encoder.conftest import write_text_dir

    with tempfile.TemporaryDirectory() as tmp:
        text = write_text_dir(Path(tmp) / "text", {"the", "volume", "shows", "not", ":", "."})
        cfg = (text / "config.json").read_text().replace('"max_position_embeddings": 64', '"max_position_embeddings": 512')
        (text / "config.json").write_text(cfg)
        t = time.perf_counter()
        m = hm.build_model("vit_base_singlescan_h2_token2744", text)
        ckpt = Path(tmp) / "chestct.pt"
        torch.save({"epoch": 0, "state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, ckpt)
        del m
        enc = hm.StudyEncoder(hm.StudyEncoderConfig(checkpoint=ckpt, text_dir=text, device=args.device))
        print(f"build + strict load: {time.perf_counter() - t:.1f} s; visual params "
              f"{sum(p.numel() for p in enc.model.visual.parameters()) / 1e6:.1f} M; device {args.device}, "
              f"threads {torch.get_num_threads()}")  # fmt: skip
        ct = phantom(args.slices)
        for run in ("first", "second"):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = enc.encode(ct, body_part_examined="WHOLEBODY")
            total = time.perf_counter() - t
            tm = enc.last_timings
            print(f"{run} study: total {total:.2f} s = preprocess {tm['preprocess_s']:.2f} s + forward "
                  f"{tm['forward_s']:.2f} s + zero-shot {tm['zeroshot_s'] * 1000:.1f} ms "
                  f"(HLIP README: ~0.1 s/study on GPU; ratio {total / 0.1:.0f}x)")  # fmt: skip
        print("crop:", out.crop_description)
        if args.relevance:
            from pipelines.models.study_encoder import interpret

            print(f"peak RSS before the relevance map {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
            t = time.perf_counter()
            rmap = interpret.relevance_map(enc, ct, "pleural_effusion", body_part_examined="WHOLEBODY")
            took = time.perf_counter() - t
            print(f"relevance map ({rmap.volume.array.shape} voxels): {took:.2f} s, "
                  f"{took / total:.1f}x the encoding of the same study")  # fmt: skip
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        if args.device.startswith("cuda"):
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
