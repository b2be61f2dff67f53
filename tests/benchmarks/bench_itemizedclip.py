"""Cost of the ItemizedCLIP item head on top of the HLIP chest-CT forward (random weights), CPU or GPU.

Run once: ``PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_itemizedclip.py [--input 112 336 336] [--device cuda]``

Builds the published ``CTRATE_HLIP_BiomedBERT_itemizedclip`` architecture (ViT-B HLIP trunk,
768 → 512 head, the 8-head attention-pooling block; the text tower is a small local BERT,
because prompt embeddings are computed once per prompt set and are not a per-study cost),
writes a checkpoint in the published layout and loads it strictly.  In the **same run** it times

* ``hlip``: the HLIP study forward alone (``visual(x)``: trunk + projection of the CLS);
* ``items K``: the ItemizedCLIP forward for K findings (trunk, projection of every token,
  normalisation, the block's ``need_weights=False`` and ``need_weights=True`` calls) — what
  :func:`pipelines.models.itemizedclip.model.forward_items` runs for a study;
* ``head K``: the item head alone on precomputed tokens,

for K = 16 and 64 (findings are random unit text embeddings: the cost does not depend on their
values), interleaved over ``--repeats`` rounds, and prints the minimum and median times and the
ratios to the HLIP forward (target: the head adds under 10 % for 64 findings); the ratio uses
the minima, the least load-disturbed estimate on a shared CPU.  It also prints the FLOP
estimate of both parts (HLIP, arXiv 2505.21862, rule for the trunk; the head counted matmul by matmul).
Peak memory: each variant runs once in a fresh child process; on CUDA the allocator's peak
above the loaded weights, on CPU the peak resident set above the one before the call, sampled
every millisecond from ``/proc/self/statm`` by a thread (the CPU allocator keeps no per-call
statistics, and ``ru_maxrss`` is dominated by model loading).

``--input`` may be smaller than the published 112 × 336 × 336 (a multiple of the 8 × 24 × 24
patch): the HLIP trunk resamples its position table, and the head/trunk ratio depends little on
the token count (both scale about linearly in it; slice windows are fixed at 14 × 14 tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

KS = (16, 64)


def _build(tmp: Path, device: str):  # type: ignore[no-untyped-def]
    from pipelines.models.itemizedclip import model as im
    from tests.pipelines.itemizedclip.conftest import write_text_dir

    text = write_text_dir(tmp / "text", {"findings", "consistent", "with"})
    ckpt = tmp / "itemized.pt"
    if not ckpt.exists():
        m = im.build_model(im.CHEST_MODEL, text)
        torch.save({"epoch": 0, "name": "bench", "state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}},
                   ckpt)  # fmt: skip
        del m
    model, _ = im.load_model(ckpt, text)
    return model.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _runners(model, x: torch.Tensor, queries: dict[int, torch.Tensor]):  # type: ignore[no-untyped-def]
    from pipelines.models.itemizedclip.model import forward_items, item_head

    with torch.inference_mode():
        _, tokens = model.encode_image(x)
    runners = {"hlip": lambda: model.visual(x)}
    for k, q in queries.items():
        runners[f"items {k}"] = lambda q=q: forward_items(model, x, q)
        runners[f"head {k}"] = lambda q=q: item_head(model, tokens, q)
    return runners


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> None:
    """One variant in a fresh process: print its peak memory above the pre-call state as JSON."""
    import ctypes
    import gc
    import threading

    torch.manual_seed(0)
    model = _build(Path(args.tmp), args.device)
    x = torch.randn(1, 1, 1, *args.input, device=args.device)
    queries = {k: torch.randn(k, 512, device=args.device) for k in KS}
    fn = _runners(model, x, queries)[args.child]
    gc.collect()
    with contextlib.suppress(OSError):  # hand freed heap back to the OS so the baseline is what is really in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_gpu = torch.cuda.memory_allocated() if args.device.startswith("cuda") else 0
    base, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with torch.inference_mode():
        fn()
    _sync(args.device)
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    out = {"variant": args.child, "rss_before_mib": base / 2**20, "rss_extra_mib": (peak[0] - base) / 2**20,
           "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip
    if args.device.startswith("cuda"):
        out["gpu_extra_mib"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    print(json.dumps(out))


def head_flops(n_tokens: int, k: int, width: int = 768, e: int = 512) -> float:
    """Matmul FLOPs of the item path beyond HLIP: head.proj on every token, and two block calls
    (q/k/v/out projections, q·kᵀ and a·v over L + 1 keys)."""
    proj = 2 * n_tokens * width * e
    block = 2 * (k * e * e + 2 * n_tokens * e * e + 2 * k * (n_tokens + 1) * e + k * e * e)
    return proj + 2 * block


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--input", type=int, nargs=3, default=(56, 168, 168), metavar=("D", "H", "W"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant child processes")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        torch.manual_seed(0)
        model = _build(tmp, args.device)
        d, h, w = (s // p for s, p in zip(args.input, (8, 24, 24), strict=True))
        print(f"build + strict load {time.perf_counter() - t:.1f} s; input {tuple(args.input)} → {d}×{h}×{w} = "
              f"{d * h * w} tokens; device {args.device}; threads {torch.get_num_threads()}")  # fmt: skip
        x = torch.randn(1, 1, 1, *args.input, device=args.device)
        queries = {k: torch.randn(k, 512, device=args.device) for k in KS}
        runners = _runners(model, x, queries)
        times: dict[str, list[float]] = {name: [] for name in runners}
        with torch.inference_mode():
            for fn in runners.values():  # warm-up
                fn()
            for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit every variant
                for name, fn in runners.items():
                    _sync(args.device)
                    t = time.perf_counter()
                    fn()
                    _sync(args.device)
                    times[name].append(time.perf_counter() - t)
        best = {name: min(v) for name, v in times.items()}
        base = best["hlip"]
        print(f"{'variant':<10} {'min s':>9} {'median s':>9} {'min vs HLIP':>12}   (all {args.repeats} runs)")
        for name, v in best.items():
            print(f"{name:<10} {v:>9.4f} {statistics.median(times[name]):>9.4f} {v / base:>11.3f}x   "
                  f"{', '.join(f'{s:.4f}' for s in times[name])}")  # fmt: skip
        from dataclasses import replace

        from pipelines.models.study_encoder import visual

        spec = visual.registered_spec("vit_base_singlescan_h2_token2744")
        trunk_flops = visual.flops_estimate(replace(spec, img_size=tuple(args.input)))
        for k in KS:
            print(f"K={k}: head adds {best[f'head {k}'] / base * 100:.2f} % of the HLIP forward time "
                  f"(full item forward − HLIP forward: {(best[f'items {k}'] - base) / base * 100:+.2f} %); "
                  f"FLOPs {head_flops(d * h * w, k) / 1e9:.2f} G vs trunk {trunk_flops / 1e9:.0f} G = "
                  f"{head_flops(d * h * w, k) / trunk_flops * 100:.2f} %")  # fmt: skip
        if not args.no_memory:
            print("peak memory of one call above the state before it, one fresh process per variant:")
            peaks = {}
            for name in ("hlip", *(f"items {k}" for k in KS)):
                cmd = [sys.executable, __file__, "--child", name, "--tmp", str(tmp), "--device", args.device,
                       "--input", *map(str, args.input)]  # fmt: skip
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                peaks[name] = json.loads(res.stdout.strip().splitlines()[-1])
            key = "gpu_extra_mib" if args.device.startswith("cuda") else "rss_extra_mib"
            base_peak = max(peaks["hlip"][key], 1e-9)
            for name, p in peaks.items():
                print(f"  {name:<9} {key} {p[key]:.1f} MiB ({p[key] / base_peak:.3f}x HLIP; "
                      f"resident before the call {p['rss_before_mib']:.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
