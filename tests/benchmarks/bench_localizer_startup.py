"""Localizer start-up benchmark: cold (texts encoded) versus warm (text features from the cache).

Run:  python tests/benchmarks/bench_localizer_startup.py [--device cuda] [--files] [--rounds 2]

Full-size random-weight checkpoints (coarse ``ClipText_ResidualNet`` 96x96x128, fine 64³,
ViT-B/32 text towers) and a synthetic vocabulary with the published counts (124 coarse keys,
203 fine words), as in ``bench_localizer.py``.  In one run, against one fresh cache
directory:

* cold: :meth:`Localizer.from_checkpoints` with an empty :class:`TextFeatureCache`, which
  encodes all 327 candidate texts and writes the cache;
* warm: the same call again (new process state, same cache directory), which verifies and
  reads the cached features instead.

With ``--files`` both stages are written as ``params.pth`` files first and the whole
:meth:`Localizer.load` is timed (file read, weights-content hash, network build, texts),
which is what a worker restart costs.  Target (issue 18): warm start under 5 s.  No
assertion: this prints numbers, including the cold/warm ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipelines.models.localizer import Localizer
from pipelines.models.text_cache import TextFeatureCache
from tests.benchmarks.bench_localizer import random_checkpoint, synthetic_vocabulary


def _write_release(root: Path, seed: int) -> tuple[Path, Path, Path, Path]:
    """Full-size checkpoints and the synthetic vocabulary as files in HCL-AL's release layout."""
    vocab = synthetic_vocabulary()
    paths = []
    for name, crop, spacing, s in (("coarse", (96, 96, 128), (2.0, 2.0, 3.0), seed),
                                   ("fine", (64, 64, 64), (1.5, 1.5, 1.5), seed + 1)):  # fmt: skip
        ckpt = random_checkpoint(crop, spacing, s)
        path = root / name / "params.pth"
        path.parent.mkdir(parents=True)
        torch.save({"net": ckpt.net, "state_dict": {f"module.{k}": v for k, v in ckpt.state_dict.items()},
                    **ckpt.preprocessing.to_json()}, path)  # fmt: skip
        paths.append(path)
    v, d = root / "anatomy_vocabulary_library.json", root / "augmented_location_descriptions.json"
    tree: dict[str, dict[str, dict[str, str]]] = {}
    for key in vocab.coarse_keys:
        tree.setdefault(vocab.region_of[key], {})[key] = {w: vocab.finals[(key, w)] for w in vocab.children[key]}
    v.write_text(json.dumps(tree), encoding="utf-8")
    d.write_text(json.dumps(dict(vocab.descriptions)), encoding="utf-8")
    return paths[0], paths[1], v, d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--files", action="store_true", help="time Localizer.load from params.pth files")
    ap.add_argument("--rounds", type=int, default=2, help="warm starts to time (the best is reported)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")

    with tempfile.TemporaryDirectory(prefix="locus-bench-startup-") as tmp:
        root = Path(tmp)
        cache_dir = root / "text-features"
        if args.files:
            files = _write_release(root / "release", seed=7)

            def start() -> Localizer:
                return Localizer.load(*files, device=args.device, text_cache=TextFeatureCache(cache_dir))
        else:
            coarse = random_checkpoint((96, 96, 128), (2.0, 2.0, 3.0), 7)
            fine = random_checkpoint((64, 64, 64), (1.5, 1.5, 1.5), 8)
            vocab = synthetic_vocabulary()

            def start() -> Localizer:
                return Localizer.from_checkpoints(coarse, fine, vocab, device=args.device,
                                                  text_cache=TextFeatureCache(cache_dir))

        # Wall time, and CPU time of this process (all threads): on a shared machine the wall
        # time also counts waiting for a core, the CPU time does not.
        t0, c0 = time.perf_counter(), time.process_time()
        cold_loc = start()
        cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
        warm_times, warm_cpus = [], []
        for _ in range(max(1, args.rounds)):
            t0, c0 = time.perf_counter(), time.process_time()
            warm_loc = start()
            warm_times.append(time.perf_counter() - t0)
            warm_cpus.append(time.process_time() - c0)
        warm = min(warm_times)
        same = torch.equal(cold_loc.coarse.text_emb, warm_loc.coarse.text_emb) and torch.equal(
            cold_loc.fine.text_emb, warm_loc.fine.text_emb)
        n_texts = len(cold_loc.coarse.words) + len(cold_loc.fine.words)
        print(f"{'Localizer.load (files)' if args.files else 'Localizer.from_checkpoints'}, {n_texts} texts")
        print(f"cold start (encode texts, write cache): {cold:8.2f} s")
        print(f"warm start (verified cache read):       {warm:8.2f} s  (rounds: "
              f"{', '.join(f'{t:.2f}' for t in warm_times)})")
        print(f"CPU time cold / best warm:              {cold_cpu:8.2f} s / {min(warm_cpus):.2f} s")
        print(f"cold / warm ratio:                      {cold / warm:8.1f}x   target: warm < 5 s "
              f"({'met' if warm < 5 else 'NOT met'})")
        print(f"text features identical cold vs warm:   {same}")


if __name__ == "__main__":
    main()
