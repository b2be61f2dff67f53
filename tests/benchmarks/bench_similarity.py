"""Similar-study search over 100,000 stored 512-d embeddings (target: under 200 ms per query).

Run: ``.venv/bin/python tests/benchmarks/bench_similarity.py [--n 100000] [--url postgresql+psycopg://...]``
Prints the query time split into loading vectors from the database, building the matrix and
the exact search, and checks the result against a numpy brute force.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import insert

from node.db import Database
from node.db.models import Study, StudyEmbedding, StudyVersion
from node.similarity import find_similar

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MODEL = "hlip-bench"


def fill(db: Database, vecs: np.ndarray) -> None:
    n = len(vecs)
    with db.session() as s:
        s.execute(insert(Study), [dict(id=i + 1, study_uid=f"1.2.826.0.1.{i}", status="analysed",
                                       first_received_at=T0, last_received_at=T0) for i in range(n)])  # fmt: skip
        s.execute(insert(StudyVersion), [dict(id=i + 1, study_id=i + 1, version=1, state="analysed",
                                              completion_rule="bench", ready_at=T0, instance_count=1,
                                              instance_set_hash="0" * 64) for i in range(n)])  # fmt: skip
        s.execute(insert(StudyEmbedding), [dict(study_version_id=i + 1, model_id=MODEL, dim=vecs.shape[1],
                                                preprocessing_version="p", vector=vecs[i].astype("<f4").tobytes(),
                                                created_at=T0) for i in range(n)])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--url", default=None, help="database URL (default: a temporary SQLite file)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(args.url or f"sqlite:///{Path(tmp) / 'bench.db'}")
        db.upgrade()
        t = time.perf_counter()
        fill(db, vecs)
        print(f"stored {args.n} x {args.dim} embeddings in {time.perf_counter() - t:.1f} s ({db.engine.url.get_backend_name()})")
        times, parts = [], []
        for r in range(args.repeat):
            q = int(rng.integers(args.n))
            t = time.perf_counter()
            with db.session(readonly=True) as s:
                res = find_similar(s, f"1.2.826.0.1.{q}", k=10)
            times.append(time.perf_counter() - t)
            parts.append(res.timings_s)
            sims = vecs @ vecs[q]
            sims[q] = -np.inf
            expect = [f"1.2.826.0.1.{i}" for i in np.argsort(-sims)[:10]]
            assert [h.study_uid for h in res.results] == expect, "search differs from brute force"
        med = statistics.median(times)
        print(f"query (k=10, exact, {args.n} candidates): median {med * 1000:.0f} ms, "
              f"min {min(times) * 1000:.0f} ms over {args.repeat}; target 200 ms -> ratio {med / 0.2:.2f}")
        for key in parts[0]:
            print(f"  {key}: median {statistics.median(p[key] for p in parts) * 1000:.0f} ms")
        db.dispose()


if __name__ == "__main__":
    main()
