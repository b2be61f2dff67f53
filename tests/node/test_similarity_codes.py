"""The int8-code first pass of similar-study search: its intervals hold the exact float32 score,
and the search returns exactly what scoring every float32 vector returns (SQLite and PostgreSQL),
on data built to defeat it: near-ties, duplicates, vectors the codes cannot tell apart, k above
the number of candidates, zero and out-of-range vectors."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import numpy as np
import pytest

from node import similarity
from node.db import Database, embedding_codes, embedding_packs, repo
from node.db.models import StudyEmbeddingPack
from node.similarity import cosine, find_similar
from tests.node.test_similarity import add_version

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
MODEL = "hlip-codes-test"


def adversarial(rng: np.random.Generator, dim: int) -> np.ndarray:
    """Rows that sit inside each other's quantization error, exact duplicates and plain noise."""
    base = rng.normal(size=dim).astype(np.float32)
    rows = [base]
    rows += [base + np.float32(1e-6) * rng.normal(size=dim).astype(np.float32) for _ in range(8)]  # below int8 steps
    rows += [base.copy() for _ in range(4)]  # exact duplicates: ties broken by Study Instance UID
    rows += [base * np.float32(3.0), base * np.float32(1e-3)]  # same direction, other norms (float32 near-ties)
    spike = np.zeros(dim, np.float32)
    spike[0] = 1.0
    rows += [spike, spike + np.float32(1e-7), np.zeros(dim, np.float32)]  # one-hot, its near copy, a zero vector
    rows += [np.float32(1e-20) * base, np.float32(1e20) * base]  # norms the codes do not bound: always re-scored
    mixed = base.copy()
    mixed[: dim // 2] = rng.normal(size=dim // 2)
    rows += [mixed, -base]
    rows += list(rng.normal(size=(14, dim)).astype(np.float32))
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("dim", [1, 3, 64, 512])
def test_intervals_hold_the_exact_float32_score(dim: int) -> None:
    rng = np.random.default_rng(dim)
    vecs = np.vstack([adversarial(rng, dim), rng.standard_cauchy(size=(40, dim)).astype(np.float32)])
    c = embedding_codes.quantize(vecs)
    assert c.codes.dtype == np.int8 and np.abs(c.codes.astype(int)).max() <= 127
    for query in [vecs[0], vecs[15], vecs[-1], rng.normal(size=dim).astype(np.float32)]:
        direction = embedding_codes.query_direction(query)
        assert direction is not None
        lo, hi = embedding_codes.bounds(embedding_codes.code_dots(c.codes, direction), c.scales, c.norms,
                                        c.residual_norms, dim)  # fmt: skip
        for rows in (slice(None), slice(0, 7), slice(5, 6)):  # the exact score depends on the matrix shape
            exact = cosine(vecs[rows], query).astype(np.float64)
            assert ((lo[rows] <= exact) & (exact <= hi[rows])).all()
        zero = int(np.flatnonzero(~vecs.any(axis=1))[0])
        assert lo[zero] == hi[zero] == 0.0
        assert np.isinf(lo[18:20]).all() and np.isinf(hi[18:20]).all()  # 1e-20, 1e20 x base: always re-scored
        finite = np.isfinite(hi) & (hi > lo)
        if dim >= 64:  # the intervals are narrow enough to prune (int8: about sqrt(d)/254 wide at worst)
            assert np.median((hi - lo)[finite]) < 0.1
    assert embedding_codes.query_direction(np.zeros(dim, np.float32)) is None
    assert embedding_codes.query_direction(np.full(dim, np.nan, np.float32)) is None


def test_quantize_is_deterministic_per_row() -> None:
    """Codes of a vector do not depend on its pack neighbours (packs are rewritten entry by entry)."""
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(9, 32)).astype(np.float32)
    whole, one = embedding_codes.quantize(vecs), embedding_codes.quantize(vecs[4:5])
    assert whole.codes[4].tobytes() == one.codes[0].tobytes()
    assert (whole.scales[4], whole.norms[4], whole.residual_norms[4]) == (one.scales[0], one.norms[0],
                                                                           one.residual_norms[0])  # fmt: skip
    residual = vecs.astype(np.float64) - whole.scales[:, None].astype(np.float64) * whole.codes
    assert (np.linalg.norm(residual, axis=1) <= whole.residual_norms).all()  # rounded up, never down


def brute_force(session, study_uid: str, k: int) -> list[tuple[str, int, float]]:  # type: ignore[no-untyped-def]
    """Every stored candidate scored in float32 as the packs hold it, sorted in Python by (-score, UID)."""
    from node.db.embeddings import study_id, study_uids

    own = study_id(session, study_uid)
    qvec = None
    for chunk in embedding_packs.scan(session, MODEL, "p1"):
        hit = np.flatnonzero(chunk.study_ids == own)
        if hit.size:
            qvec = chunk.vectors[int(hit[0])].copy()
    assert qvec is not None
    scored = []
    for chunk in embedding_packs.scan(session, MODEL, "p1"):
        scores = cosine(chunk.vectors, qvec)
        scored += [(int(i), int(v), float(s)) for i, v, s in zip(chunk.study_ids, chunk.versions, scores, strict=True)
                   if int(i) != own]  # fmt: skip
    uids = study_uids(session, [i for i, _, _ in scored])
    ordered = sorted(scored, key=lambda e: (-e[2], uids[e[0]]))[:k]
    return [(uids[i], v, s) for i, v, s in ordered]


@pytest.fixture
def adversarial_db(database: Database, monkeypatch: pytest.MonkeyPatch) -> tuple[Database, int]:
    monkeypatch.setattr(embedding_packs, "PACK_SIZE", 8)  # several packs, a partial last one
    rng = np.random.default_rng(29)
    vecs = adversarial(rng, 48)
    order = rng.permutation(len(vecs))  # insertion (pack) order differs from UID order
    with database.session() as s:
        for i in order:
            vid = add_version(s, f"1.2.840.55.{i}")
            repo.store_embedding(s, vid, model_id=MODEL, vector=vecs[i].tolist(), preprocessing_version="p1", now=T0)
        vid = add_version(s, "1.2.840.55.3", version=2)  # a newer version replaces the entry in place
        repo.store_embedding(s, vid, model_id=MODEL, vector=vecs[5].tolist(), preprocessing_version="p1", now=T0)
    with database.session(readonly=True) as s:
        assert embedding_packs.verify(s) == []
    return database, len(vecs)


def test_search_equals_the_full_float32_scan(adversarial_db: tuple[Database, int],
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    database, n = adversarial_db
    full_scans = []
    real_full = similarity._scan_full
    monkeypatch.setattr(similarity, "_scan_full", lambda *a: full_scans.append(a) or real_full(*a))
    pruned = 0
    for query in [0, 1, 3, 9, 13, 15, 16, 17, 18, 19, 20, 21, 24, n - 1]:
        uid = f"1.2.840.55.{query}"
        for k in (1, 2, 5, 12, n - 1, n + 50):
            with database.session(readonly=True) as s:
                full_scans.clear()
                got = find_similar(s, uid, k=k, model_id=MODEL)
                codes_fell_back = bool(full_scans)
                full = find_similar(s, uid, k=k, model_id=MODEL, strategy="full")
                want = brute_force(s, uid, k)
            triples = [(h.study_uid, h.version, h.similarity) for h in got.results]
            assert triples == [(h.study_uid, h.version, h.similarity) for h in full.results]  # bit for bit
            assert triples == want
            assert got.candidates == full.candidates == n - 1
            assert codes_fell_back == (query in (17, 18, 19))  # zero, 1e-20 x and 1e20 x base: not bounded
            pruned += got.rescored < got.candidates
    assert pruned > 0  # the codes did rule candidates out, exactly where they could


def test_duplicates_tie_by_uid(adversarial_db: tuple[Database, int]) -> None:
    database, _ = adversarial_db
    with database.session(readonly=True) as s:
        res = find_similar(s, "1.2.840.55.0", k=15, model_id=MODEL)
    # 9..12 are exact copies of 0 (stored in shuffled pack positions): one score, ordered by UID
    copies = [h for h in res.results if h.study_uid in {f"1.2.840.55.{i}" for i in (9, 10, 11, 12)}]
    assert [h.study_uid for h in copies] == [f"1.2.840.55.{i}" for i in (10, 11, 12, 9)]
    assert len({h.similarity for h in copies}) == 1
    assert [(-h.similarity, h.study_uid) for h in res.results] == sorted((-h.similarity, h.study_uid)
                                                                         for h in res.results)  # fmt: skip


def test_random_data_prunes_most_candidates(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedding_packs, "PACK_SIZE", 16)
    rng = np.random.default_rng(8)
    vecs = rng.normal(size=(160, 256)).astype(np.float32)
    with database.session() as s:
        for i, v in enumerate(vecs):
            vid = add_version(s, f"1.2.840.56.{i}")
            repo.store_embedding(s, vid, model_id=MODEL, vector=v.tolist(), preprocessing_version="p1", now=T0)
    with database.session(readonly=True) as s:
        res = find_similar(s, "1.2.840.56.7", k=3)
        assert [(h.study_uid, h.version, h.similarity) for h in res.results] == brute_force(s, "1.2.840.56.7", 3)
    assert res.rescored < res.candidates // 4


def test_pack_rewritten_between_reads_falls_back_to_the_full_scan(
    adversarial_db: tuple[Database, int], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL READ COMMITTED: a writer may replace a vector between the codes and the vectors."""
    database, _ = adversarial_db
    real = embedding_packs.fetch_vectors

    def rewritten(session, pack_ids):  # type: ignore[no-untyped-def]
        out = real(session, pack_ids)
        for pid, chunk in out.items():
            moved = -chunk.vectors  # same study ids and versions, other vectors
            out[pid] = embedding_packs.PackChunk(chunk.study_ids, chunk.versions, moved)
        return out

    monkeypatch.setattr(embedding_packs, "fetch_vectors", rewritten)
    with database.session(readonly=True) as s, caplog.at_level(logging.WARNING, "node.similarity"):
        got = find_similar(s, "1.2.840.55.1", k=5, model_id=MODEL)
        want = brute_force(s, "1.2.840.55.1", 5)
    assert [(h.study_uid, h.version, h.similarity) for h in got.results] == want
    assert got.rescored == got.candidates and "do not bound" in caplog.text


def test_verify_reports_codes_that_disagree_with_vectors(adversarial_db: tuple[Database, int]) -> None:
    database, _ = adversarial_db
    with database.session() as s:
        pack = s.query(StudyEmbeddingPack).order_by(StudyEmbeddingPack.pack_no).first()
        assert pack is not None
        pack.norms = (np.frombuffer(pack.norms, "<f4") * np.float32(2)).astype("<f4").tobytes()
        s.flush()
        assert any("codes differ" in p for p in embedding_packs.verify(s))
        assert embedding_packs.rebuild(s, MODEL) > 0
        assert embedding_packs.verify(s) == []


def test_migration_0003_downgrades_and_backfills_codes_again(adversarial_db: tuple[Database, int]) -> None:
    """0003 down (the packs go, the embedding rows stay) and up again: codes rebuilt by its frozen copy."""
    from alembic import command
    from sqlalchemy import inspect

    from node.db.base import alembic_config

    database, n = adversarial_db
    with database.engine.connect() as connection:
        command.downgrade(alembic_config(connection), "0002")
        connection.commit()
        assert "study_embedding_packs" not in inspect(connection).get_table_names()
    database.upgrade()
    with database.session(readonly=True) as s:
        assert embedding_packs.verify(s) == []  # codes equal node.db.embedding_codes.quantize bit for bit
        got = find_similar(s, "1.2.840.55.2", k=6, model_id=MODEL)
        assert [(h.study_uid, h.version, h.similarity) for h in got.results] == brute_force(s, "1.2.840.55.2", 6)
        assert got.candidates == n - 1
