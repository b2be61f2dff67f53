"""Exact cosine similar-study search over stored embeddings, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
import pytest
from click.testing import CliRunner

from node.cli_similar import similar
from node.db import Database, repo
from node.db.models import Study, StudyVersion
from node.similarity import as_matrix, cosine, find_similar, top_k
from pipelines.errors import InputError

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
MODEL = "hlip-0123456789ab"


def add_version(session, uid: str, version: int = 1) -> int:  # type: ignore[no-untyped-def]
    study = session.query(Study).filter_by(study_uid=uid).one_or_none()
    if study is None:
        study = Study(study_uid=uid, status="analysed", first_received_at=T0, last_received_at=T0)
        session.add(study)
        session.flush()
    sv = StudyVersion(study_id=study.id, version=version, state="analysed", completion_rule="test", ready_at=T0,
                      instance_count=1, instance_set_hash="0" * 64)  # fmt: skip
    session.add(sv)
    session.flush()
    return int(sv.id)


@pytest.fixture
def filled(database: Database) -> tuple[Database, np.ndarray]:
    rng = np.random.default_rng(7)
    vecs = rng.normal(size=(30, 8)).astype(np.float32)
    with database.session() as s:
        for i, v in enumerate(vecs):
            vid = add_version(s, f"1.2.840.99.{i}")
            repo.store_embedding(s, vid, model_id=MODEL, vector=v.tolist(), preprocessing_version="p1", now=T0)
        # same studies under another model must never be mixed in
        for i in range(5):
            vid = s.query(StudyVersion).join(Study).filter(Study.study_uid == f"1.2.840.99.{i}").one().id
            repo.store_embedding(s, vid, model_id="other-model", vector=[1.0] * 4, preprocessing_version="p1", now=T0)
    return database, vecs


def brute_force(vecs: np.ndarray, q: int, k: int) -> list[str]:
    n = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    sims = n @ n[q]
    order = [i for i in np.argsort(-sims, kind="stable") if i != q][:k]
    return [f"1.2.840.99.{i}" for i in order]


def test_nearest_studies_match_brute_force(filled: tuple[Database, np.ndarray]) -> None:
    database, vecs = filled
    with database.session(readonly=True) as s:
        res = find_similar(s, "1.2.840.99.3", k=5, model_id=MODEL)
    assert [h.study_uid for h in res.results] == brute_force(vecs, 3, 5)
    assert res.candidates == 29 and res.model_id == MODEL
    n = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    assert res.results[0].similarity == pytest.approx(float(n[3] @ n[int(res.results[0].study_uid.split(".")[-1])]),
                                                      abs=1e-5)  # fmt: skip


def test_study_with_two_models_needs_a_choice(filled: tuple[Database, np.ndarray]) -> None:
    database, _ = filled
    with database.session(readonly=True) as s:
        with pytest.raises(InputError) as err:
            find_similar(s, "1.2.840.99.1")
        assert err.value.code == "ambiguous_model"
        other = find_similar(s, "1.2.840.99.1", model_id="other-model")
    assert other.candidates == 4  # only the 5 studies that have that model, minus the query
    with database.session(readonly=True) as s:
        only_one = find_similar(s, "1.2.840.99.20", k=3)  # has only MODEL
    assert only_one.model_id == MODEL


def test_latest_version_and_preprocessing_are_respected(filled: tuple[Database, np.ndarray]) -> None:
    database, vecs = filled
    with database.session() as s:
        # study 10 gets version 2 equal to study 11's vector: it becomes 11's nearest neighbour
        vid = add_version(s, "1.2.840.99.10", version=2)
        repo.store_embedding(s, vid, model_id=MODEL, vector=vecs[11].tolist(), preprocessing_version="p1", now=T0)
        vid = add_version(s, "1.2.840.99.12", version=2)
        repo.store_embedding(s, vid, model_id=MODEL, vector=vecs[11].tolist(), preprocessing_version="p2", now=T0)
    with database.session(readonly=True) as s:
        res = find_similar(s, "1.2.840.99.11", k=1, model_id=MODEL)
    assert res.results[0].study_uid == "1.2.840.99.10" and res.results[0].version == 2
    assert res.results[0].similarity == pytest.approx(1.0, abs=1e-6)
    assert res.excluded_other_preprocessing == 1


def test_unknown_study(filled: tuple[Database, np.ndarray]) -> None:
    database, _ = filled
    with database.session(readonly=True) as s, pytest.raises(InputError) as err:
        find_similar(s, "9.9.9")
    assert err.value.code == "no_embedding"


def test_top_k_ties_are_ordered_by_uid() -> None:
    m = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], np.float32)
    assert top_k(cosine(m, np.array([1, 0], np.float32)), 2, ["c", "b", "a", "a2"]) == [(3, 1.0), (1, 1.0)]
    assert cosine(np.zeros((1, 2), np.float32), np.array([1, 0], np.float32)).tolist() == [0.0]


def test_as_matrix_rejects_mixed_dimensions() -> None:
    from node.db.embeddings import StoredVector

    rows = [StoredVector("1", 1, "m", 2, "p", np.ones(2, "<f4").tobytes()),
            StoredVector("2", 1, "m", 3, "p", np.ones(3, "<f4").tobytes())]  # fmt: skip
    with pytest.raises(InputError):
        as_matrix(rows, 2)


def test_cli_json(filled: tuple[Database, np.ndarray], monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    database, vecs = filled
    from node.settings import LocusSettings

    monkeypatch.setenv("LOCUS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LOCUS_DATABASE__URL", database.engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("LOCUS_DATABASE__AUTO_UPGRADE", "false")
    settings = LocusSettings()
    out = CliRunner().invoke(similar, ["1.2.840.99.3", "--k", "3", "--model", MODEL, "--json"], obj=settings)
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert [r["study_uid"] for r in data["results"]] == brute_force(vecs, 3, 3)
    text = CliRunner().invoke(similar, ["9.9.9"], obj=settings)
    assert text.exit_code == 1 and "no such study" in text.output


# ----------------------------------------------------------------- packed search copy


def reference_search(session, study_uid: str, model_id: str, k: int) -> list[tuple[str, int, float]]:  # type: ignore[no-untyped-def]
    """Brute force from the source rows (``study_embeddings``, latest version per study) in float64."""
    from node.db.embeddings import model_vectors

    rows = model_vectors(session, model_id)
    ref = next(r for r in rows if r.study_uid == study_uid)
    qv = np.frombuffer(ref.vector, "<f4").astype(np.float64)
    scored = []
    for r in rows:
        if r.study_uid == study_uid or r.preprocessing_version != ref.preprocessing_version:
            continue
        v = np.frombuffer(r.vector, "<f4").astype(np.float64)
        scored.append((-float(v @ qv / (np.linalg.norm(v) * np.linalg.norm(qv))), r.study_uid, r.version))
    return [(uid, ver, -s) for s, uid, ver in sorted(scored)[:k]]


def test_packs_follow_random_store_sequences(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """New versions, replacements, late older versions, another preprocessing: search stays exact."""
    from node.db import embedding_packs

    monkeypatch.setattr(embedding_packs, "PACK_SIZE", 4)  # many packs, partial last packs
    rng = np.random.default_rng(11)
    versions: dict[str, int] = {}
    for step in range(60):
        uid = f"1.2.840.77.{int(rng.integers(15))}"
        with database.session() as s:
            op = rng.choice(["new", "new", "replace", "late", "prep"]) if uid in versions else "new"
            if op in ("new", "prep"):
                versions[uid] = versions.get(uid, 0) + 1
                vid = add_version(s, uid, versions[uid])
            else:
                vid = s.query(StudyVersion).join(Study).filter(
                    Study.study_uid == uid, StudyVersion.version == (1 if op == "late" else versions[uid])).one().id
            repo.store_embedding(s, vid, model_id=MODEL, vector=rng.normal(size=6).astype(np.float32).tolist(),
                                 preprocessing_version="p2" if op == "prep" else "p1", now=T0)  # fmt: skip
        if step % 10 == 9:
            with database.session(readonly=True) as s:
                assert embedding_packs.verify(s) == []
                for query in sorted(versions)[:4]:
                    res = find_similar(s, query, k=5, model_id=MODEL)
                    got = [(h.study_uid, h.version, h.similarity) for h in res.results]
                    want = reference_search(s, query, MODEL, 5)
                    assert [g[:2] for g in got] == [w[:2] for w in want]
                    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], abs=1e-5)


def test_rebuild_restores_packs_after_bulk_load(filled: tuple[Database, np.ndarray]) -> None:
    from node.db import embedding_packs
    from node.db.models import StudyEmbeddingPack

    database, vecs = filled
    with database.session() as s:
        s.query(StudyEmbeddingPack).delete()
        assert embedding_packs.verify(s)  # every entry is missing now
        assert embedding_packs.rebuild(s) == 35
        assert embedding_packs.verify(s) == []
    with database.session(readonly=True) as s:
        assert [h.study_uid for h in find_similar(s, "1.2.840.99.3", k=5, model_id=MODEL).results] == \
            brute_force(vecs, 3, 5)  # fmt: skip


def test_migration_backfills_packs_from_existing_rows(db_url: str) -> None:
    from sqlalchemy import MetaData, Table, insert

    from node.db import embedding_packs

    db = Database(db_url)
    try:
        db.upgrade("0002")
        rng = np.random.default_rng(5)
        vecs = rng.normal(size=(300, 4)).astype("<f4")
        # the tables as they are at 0002 (later revisions add columns the models know): reflected
        with db.engine.begin() as conn:
            meta = MetaData()
            study_t, version_t, embedding_t = (Table(name, meta, autoload_with=conn)
                                               for name in ("studies", "study_versions", "study_embeddings"))
            conn.execute(insert(study_t), [dict(id=i, study_uid=f"1.2.9.{i}", status="analysed", first_received_at=T0,
                                                last_received_at=T0, instance_count=1, latest_version=1,
                                                has_late_instances=False) for i in range(1, 201)])  # fmt: skip
            conn.execute(insert(version_t), [dict(id=i + 1, study_id=i % 200 + 1, version=i // 200 + 1,
                                                     state="analysed", completion_rule="t", ready_at=T0,
                                                     instance_count=1, instance_set_hash="0" * 64)
                                                for i in range(300)])  # studies 1..100 get two versions; fmt: skip
            conn.execute(insert(embedding_t), [dict(study_version_id=i + 1, model_id=MODEL, dim=4,
                                                       preprocessing_version="p1", vector=v.tobytes(), created_at=T0)
                                                  for i, v in enumerate(vecs)])  # fmt: skip
        db.upgrade()
        with db.session(readonly=True) as s:
            assert embedding_packs.verify(s) == []
            assert embedding_packs.group_dims(s, MODEL) == {"p1": (4, 200)}
            res = find_similar(s, "1.2.9.7", k=3)
            assert [(h.study_uid, h.version) for h in res.results] == \
                [(u, v) for u, v, _ in reference_search(s, "1.2.9.7", MODEL, 3)]  # fmt: skip
    finally:
        db.dispose()
