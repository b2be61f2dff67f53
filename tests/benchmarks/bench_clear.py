"""Cost per study of Locus's CLEAR path: slice extraction, slice encoding, storage, 10 ABMIL heads.

Run once: ``PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_clear.py [--device cuda] [--slices 600]
[--matrix 512] [--train-studies 0]``

Synthetic whole-body PET/CT: CT ``matrix × matrix × slices`` at 0.98 mm × 3 mm (600 slices =
1.8 m), PET 200 × 200 at 4 mm over the same z range with a few hot spheres, both in one Frame
of Reference.  The encoder is ResNet-18 with random weights, saved and strictly loaded through
the real registry path.  Prints wall times, peak RSS and the stored bytes per study.  With
``--train-studies N`` it also times training one 8-label endpoint from generated stored
features (N studies, 3 folds + final head, 5 epochs each).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _ct(n_slices: int, n: int, dxy: float = 0.98, dz: float = 3.0):  # type: ignore[no-untyped-def]
    from pipelines.dicom.volume import Volume

    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    x = (x - n / 2) * dxy * 512 / n
    y = (y - n / 2) * dxy * 512 / n
    body = (x / 170) ** 2 + (y / 120) ** 2 <= 1
    arr = np.full((n_slices, n, n), -1000.0, np.float32)
    arr[:, body] = 40.0
    aff = np.diag([dxy * 512 / n, dxy * 512 / n, dz, 1.0])
    aff[:3, 3] = (-256 * dxy, -256 * dxy, -n_slices * dz / 2)
    return Volume(arr, aff, frame_of_reference_uid="1.2.3", series_instance_uid="1.2.3.1", modality="CT")


def _pet(z_extent: float):  # type: ignore[no-untyped-def]
    from pipelines.dicom.volume import Volume

    nz = int(z_extent / 4.0) + 1
    arr = np.ones((nz, 200, 200), np.float32)
    rng = np.random.default_rng(0)
    for _ in range(5):
        c = rng.integers((5, 50, 50), (nz - 5, 150, 150))
        arr[c[0] - 2 : c[0] + 3, c[1] - 3 : c[1] + 4, c[2] - 3 : c[2] + 4] = 8.0
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = (-400.0, -400.0, -z_extent / 2)
    return Volume(arr, aff, frame_of_reference_uid="1.2.3", series_instance_uid="1.2.3.2", modality="PT")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--slices", type=int, default=600, help="CT slices (3 mm each)")
    ap.add_argument("--matrix", type=int, default=512, help="CT in-plane matrix (field of view kept)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=10)
    ap.add_argument("--train-studies", type=int, default=0)
    args = ap.parse_args()

    from pipelines.models.clear.abmil import AbmilHead
    from pipelines.models.clear.encoder import (
        ClearEncoderSpec,
        build_backbone,
        load_encoder,
        save_encoder_checkpoint,
    )
    from pipelines.models.clear.slices import DEFAULT_PREPROCESSING, extract_slices
    from pipelines.models.clear.store import SliceFeatures
    from pipelines.models.registry import PinnedFile

    print(f"device={args.device} torch_threads={torch.get_num_threads()} CT={args.matrix}x{args.matrix}x{args.slices}")
    ct = _ct(args.slices, args.matrix)
    pet = _pet(args.slices * 3.0)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        net, _ = build_backbone("resnet18")
        path = Path(tmp) / "enc.pt"
        digest = save_encoder_checkpoint(path, net, "resnet18", DEFAULT_PREPROCESSING)
        enc = load_encoder(ClearEncoderSpec("bench", "resnet18", PinnedFile(str(path), digest)), device=args.device)

    t0 = time.perf_counter()
    stack = extract_slices(ct, pet)
    t_extract = time.perf_counter() - t0
    print(f"extract: {stack.images.shape[0]} slices of {stack.images.shape[1:]} in {t_extract:.2f} s "
          f"({1000 * t_extract / stack.images.shape[0]:.1f} ms/slice), RSS peak {_rss_mib():.0f} MiB")  # fmt: skip

    enc.embed(stack.images[: min(4, len(stack.images))])  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    feats = enc.encode(stack, batch_size=args.batch)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_enc = time.perf_counter() - t0
    print(f"encode: {feats.n_slices} × {feats.dim} in {t_enc:.2f} s ({1000 * t_enc / feats.n_slices:.1f} ms/slice)")

    t0 = time.perf_counter()
    blob = feats.pack()
    back = SliceFeatures.unpack(blob)
    t_store = time.perf_counter() - t0
    assert back.features.tobytes() == feats.features.tobytes()
    print(f"storage: {feats.nbytes} B arrays, {len(blob)} B packed per study ({len(blob) / 1024:.0f} KiB); "
          f"pack+unpack {1000 * t_store:.1f} ms")  # fmt: skip

    heads = [AbmilHead(feats.dim, 8).eval() for _ in range(args.heads)]
    x = torch.from_numpy(back.features.astype(np.float32))[None]
    for h in heads:
        h.predict(x)  # warm-up
    reps = []
    for _ in range(5):  # best of 5: the machine is shared
        t0 = time.perf_counter()
        for h in heads:
            h.predict(x)
        reps.append(time.perf_counter() - t0)
    t_heads = min(reps)
    print(f"heads: {args.heads} endpoints (8 labels each) on CPU in {1000 * t_heads:.1f} ms per study")
    print(f"total per study: {t_extract + t_enc + t_heads:.2f} s; RSS peak {_rss_mib():.0f} MiB")

    if args.train_studies:
        from training.clear.endpoint import EndpointConfig, EndpointData, train_endpoint

        rng = np.random.default_rng(0)
        bags = [rng.normal(size=(int(rng.integers(150, 250)), feats.dim)).astype(np.float16)
                for _ in range(args.train_studies)]  # fmt: skip
        y = rng.integers(0, 2, size=(args.train_studies, 8))
        data = EndpointData(bags, y, [f"P{i}" for i in range(args.train_studies)], tuple(f"l{i}" for i in range(8)))
        t0 = time.perf_counter()
        train_endpoint(data, EndpointConfig(folds=3, max_epochs=5, patience=5))
        print(f"train one endpoint: {args.train_studies} studies, 3 folds + final, 5 epochs each: "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
