"""Queries over ``study_embeddings`` for similar-study search (portable SQL: SQLite and PostgreSQL).

Vectors are stored by :func:`node.db.repo.store_embedding` as float32 little-endian bytes;
these functions return the raw bytes so the caller can build one numpy matrix without a
Python float per value.  "A study's embedding" is the one of its latest version that has an
embedding from the given model.  Search itself reads the packed copy
(:mod:`node.db.embedding_packs`); :func:`model_vectors` is the row-wise reference it is
checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import Study, StudyEmbedding, StudyVersion


@dataclass(frozen=True)
class StoredVector:
    """One stored study embedding with the identifiers that make it comparable."""
    study_uid: str
    version: int
    model_id: str
    dim: int
    preprocessing_version: str
    vector: bytes  # float32 little-endian


def _rows(session: Session, *conditions: object) -> list[StoredVector]:
    stmt = (
        select(Study.study_uid, StudyVersion.version, StudyEmbedding.model_id, StudyEmbedding.dim,
               StudyEmbedding.preprocessing_version, StudyEmbedding.vector)
        .join(StudyVersion, StudyVersion.id == StudyEmbedding.study_version_id)
        .join(Study, Study.id == StudyVersion.study_id)
        .where(*conditions)  # type: ignore[arg-type]
    )
    latest: dict[tuple[str, str], StoredVector] = {}
    for uid, version, model_id, dim, prep, vec in session.execute(stmt):
        key = (uid, model_id)
        if key not in latest or version > latest[key].version:
            latest[key] = StoredVector(uid, int(version), model_id, int(dim), prep, bytes(vec))
    return sorted(latest.values(), key=lambda r: (r.study_uid, r.model_id))


def study_vectors(session: Session, study_uid: str) -> list[StoredVector]:
    """The latest embedding of ``study_uid`` per model (one row per model_id)."""
    return _rows(session, Study.study_uid == study_uid)


def model_vectors(session: Session, model_id: str) -> list[StoredVector]:
    """The latest embedding of every study from ``model_id``."""
    return _rows(session, StudyEmbedding.model_id == model_id)


#: ``IN (...)`` lists are sent in chunks below SQLite's historical 999-parameter limit.
_IN_CHUNK = 500


def study_id(session: Session, study_uid: str) -> int | None:
    """``studies.id`` of a Study Instance UID (the key the embedding packs use)."""
    return session.scalar(select(Study.id).where(Study.study_uid == study_uid))


def study_uids(session: Session, study_ids: Sequence[int]) -> dict[int, str]:
    """Study Instance UIDs of ``studies.id`` values (only the few that can make a top k)."""
    out: dict[int, str] = {}
    unique = sorted(set(study_ids))
    for i in range(0, len(unique), _IN_CHUNK):
        rows = session.execute(select(Study.id, Study.study_uid).where(Study.id.in_(unique[i : i + _IN_CHUNK])))
        out.update((int(a), str(b)) for a, b in rows)
    return out
