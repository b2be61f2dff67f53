"""Similar-study search over 100,000 stored 512-d embeddings (target: under 200 ms per query).

Run: ``.venv/bin/python tests/benchmarks/bench_similarity.py [--n 100000] [--url postgresql+psycopg://...]``

Measures, in the same run and on the same database, the query through the packed copy
(:mod:`node.db.embedding_packs`, what ``locus results similar`` uses) and the previous path
(every embedding row read through the ORM, stacked into one matrix), prints both with their
ratio and the split of the packed query, and checks both against a numpy brute force.
Each query runs in a fresh session, as the CLI does; the page cache is warm after the first.
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

from node.db import Database, Session, embedding_packs
from node.db import embeddings as q
from node.db.models import Study, StudyEmbedding, StudyVersion
from node.similarity import as_matrix, cosine, find_similar, top_k

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MODEL = "hlip-bench"


def fill(db: Database, vecs: np.ndarray) -> None:
    """Bulk insert (bypassing store_embedding, so the packs are rebuilt afterwards as a bulk load must)."""
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
        embedding_packs.rebuild(s, MODEL)


def previous_path(session: Session, study_uid: str, k: int) -> list[str]:
    """The search as it was before the packs: all rows through the ORM, one matrix (reference)."""
    ref = q.study_vectors(session, study_uid)[0]
    rows = q.model_vectors(session, ref.model_id)
    same = [r for r in rows if r.preprocessing_version == ref.preprocessing_version and r.study_uid != study_uid]
    scores = cosine(as_matrix(same, ref.dim), as_matrix([ref], ref.dim)[0])
    return [same[i].study_uid for i, _ in top_k(scores, k, [r.study_uid for r in same])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--url", default=None, help="database URL (default: a temporary SQLite file)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(args.url or f"sqlite:///{Path(tmp) / 'bench.db'}")
        db.upgrade()
        t = time.perf_counter()
        fill(db, vecs)
        print(f"stored {args.n} x {args.dim} embeddings + packs in {time.perf_counter() - t:.1f} s "
              f"({db.engine.url.get_backend_name()})")  # fmt: skip
        times: dict[str, list[float]] = {"packed": [], "previous": []}
        parts = []
        for _ in range(args.repeat):
            qi = int(rng.integers(args.n))
            uid = f"1.2.826.0.1.{qi}"
            sims = vecs @ vecs[qi]
            sims[qi] = -np.inf
            expect = [f"1.2.826.0.1.{i}" for i in np.argsort(-sims)[:10]]
            for name in ("packed", "previous"):  # interleaved, so machine load hits both alike
                t = time.perf_counter()
                with db.session(readonly=True) as s:
                    if name == "packed":
                        res = find_similar(s, uid, k=10)
                        got = [h.study_uid for h in res.results]
                        parts.append(res.timings_s)
                    else:
                        got = previous_path(s, uid, 10)
                times[name].append(time.perf_counter() - t)
                assert got == expect, f"{name} search differs from brute force"
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"query (k=10, exact, {args.n - 1} candidates), median over {args.repeat} (min):")
        for name in ("packed", "previous"):
            print(f"  {name:>8}: {med[name] * 1000:7.0f} ms ({min(times[name]) * 1000:.0f} ms)")
        print(f"  packed vs previous: {med['previous'] / med['packed']:.1f}x faster; "
              f"packed vs 200 ms target: {med['packed'] / 0.2:.2f} (< 1 meets it)")
        for key in parts[0]:
            print(f"  packed {key}: median {statistics.median(p[key] for p in parts) * 1000:.0f} ms")
        db.dispose()


if __name__ == "__main__":
    main()
