"""Packed embeddings for exact similar-study search (table ``study_embedding_packs``).

``study_embeddings`` stays the source of truth (one row per study version and model).  Search
needs, per model, the vector of every study's *latest* embedded version, all of them, for every
query: read row by row that is one database page per study (a 512-d float32 vector is 2 KB, so
SQLite stores one per 4 KB page) and 100,000 studies cost about half a second before any
arithmetic.  Packs hold the same vectors ``PACK_SIZE`` to a row, contiguous, so a query reads a
few hundred rows sequentially and scores each with one matrix-vector product.

Invariant (kept by :func:`index_embedding`, called by ``store_embedding`` in the same
transaction; checked by :func:`verify`; restored by :func:`rebuild`): for every (study, model)
with an embedding, exactly one pack entry exists, holding the embedding of the study's
latest version that has one from that model, in the pack group ``(model_id,
preprocessing_version)`` of that embedding.  This is exactly the candidate set the row-wise
query (:func:`node.db.embeddings.model_vectors`) computes, so results do not change.

Each pack also holds the int8 codes of its vectors (:mod:`node.db.embedding_codes`), written by
the same :func:`_write` as the vectors, so they never disagree; the search reads the codes of
every pack (:func:`scan_codes`) and the float32 vectors only of the few packs that hold possible
results (:func:`fetch_vectors`).

Writers of one model are serialised: SQLite takes the database write lock at ``BEGIN
IMMEDIATE`` (node.db.base); PostgreSQL takes a transaction-scoped advisory lock per model.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from node.db.embedding_codes import quantize
from node.db.models import StudyEmbedding, StudyEmbeddingPack, StudyVersion

#: Vectors per pack row: 128 x 512-d float32 = 256 KB, small enough to rewrite on each store.
PACK_SIZE = 128

_IDS, _VERSIONS, _VECTORS, _CODES = np.dtype("<i8"), np.dtype("<i4"), np.dtype("<f4"), np.dtype("i1")


@dataclass(frozen=True)
class PackChunk:
    """One pack row as arrays: entry ``i`` is study ``study_ids[i]`` at ``versions[i]``."""

    study_ids: np.ndarray  # int64, studies.id
    versions: np.ndarray  # int32
    vectors: np.ndarray  # float32 [count, dim], read-only view on the fetched bytes


@dataclass(frozen=True)
class CodeChunk:
    """The quantized side of one pack row (:mod:`node.db.embedding_codes`), keyed by its ``pack_id``."""

    pack_id: int
    study_ids: np.ndarray  # int64
    versions: np.ndarray  # int32
    codes: np.ndarray  # int8 [count, dim]
    scales: np.ndarray  # float32 [count]
    norms: np.ndarray  # float32 [count]
    residual_norms: np.ndarray  # float32 [count]


def _code_chunk(pack_id: int, count: int, dim: int, ids: bytes, versions: bytes, codes: bytes, scales: bytes,
                norms: bytes, residuals: bytes) -> CodeChunk:
    if len(ids) != 8 * count or len(versions) != 4 * count or len(codes) != count * dim or \
            len(scales) != 4 * count or len(norms) != 4 * count or len(residuals) != 4 * count:
        raise ValueError(f"embedding pack {pack_id} holds codes that do not match count={count}, dim={dim}")
    return CodeChunk(pack_id, np.frombuffer(ids, _IDS), np.frombuffer(versions, _VERSIONS),
                     np.frombuffer(codes, _CODES).reshape(count, dim), np.frombuffer(scales, _VECTORS),
                     np.frombuffer(norms, _VECTORS), np.frombuffer(residuals, _VECTORS))


def _chunk(count: int, dim: int, ids: bytes, versions: bytes, vectors: bytes) -> PackChunk:
    if len(ids) != 8 * count or len(versions) != 4 * count or len(vectors) != 4 * count * dim:
        raise ValueError(f"embedding pack holds arrays that do not match count={count}, dim={dim}")
    return PackChunk(np.frombuffer(ids, _IDS), np.frombuffer(versions, _VERSIONS),
                     np.frombuffer(vectors, _VECTORS).reshape(count, dim))


def _lock(session: Session, model_id: str) -> None:
    """Serialise pack writers of one model (PostgreSQL; SQLite writers already are)."""
    if session.get_bind().dialect.name == "postgresql":
        key = zlib.crc32(f"locus.study_embedding_packs:{model_id}".encode()) - 2**31  # int4 key space
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def _write(pack: StudyEmbeddingPack, ids: np.ndarray, versions: np.ndarray, vectors: np.ndarray) -> None:
    pack.count = int(ids.shape[0])
    pack.study_ids = ids.astype(_IDS).tobytes()
    pack.versions = versions.astype(_VERSIONS).tobytes()
    pack.vectors = np.ascontiguousarray(vectors, dtype=_VECTORS).tobytes()
    _write_codes(pack, np.frombuffer(pack.vectors, _VECTORS).reshape(pack.count, -1))


def _write_codes(pack: StudyEmbeddingPack, vectors: np.ndarray) -> None:
    c = quantize(vectors)
    pack.codes = c.codes.astype(_CODES).tobytes()
    pack.code_scales = c.scales.astype(_VECTORS).tobytes()
    pack.norms = c.norms.astype(_VECTORS).tobytes()
    pack.residual_norms = c.residual_norms.astype(_VECTORS).tobytes()


def _arrays(pack: StudyEmbeddingPack) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = _chunk(pack.count, pack.dim, pack.study_ids, pack.versions, pack.vectors)
    return c.study_ids.copy(), c.versions.copy(), c.vectors.copy()


def _latest_version(session: Session, study_id: int, model_id: str) -> int | None:
    return session.scalar(
        select(func.max(StudyVersion.version))
        .join(StudyEmbedding, StudyEmbedding.study_version_id == StudyVersion.id)
        .where(StudyVersion.study_id == study_id, StudyEmbedding.model_id == model_id)
    )


def index_embedding(session: Session, *, study_id: int, version: int, model_id: str, preprocessing_version: str,
                    vector: bytes, dim: int) -> None:
    """Bring the packs up to date after an embedding row was stored (and flushed).

    A late embedding of an older version changes nothing; otherwise the study's entry is
    replaced in place (same preprocessing) or moved to the end of its new group.
    """
    if len(vector) != 4 * dim:
        raise ValueError(f"vector of {len(vector)} bytes is not {dim} float32 values")
    _lock(session, model_id)
    latest = _latest_version(session, study_id, model_id)
    if latest is not None and version < latest:
        return
    new_vec = np.frombuffer(vector, _VECTORS)
    located: tuple[int, str, int] | None = None  # (pack id, preprocessing version, position)
    for pack_id, prep, ids in session.execute(
        select(StudyEmbeddingPack.id, StudyEmbeddingPack.preprocessing_version, StudyEmbeddingPack.study_ids)
        .where(StudyEmbeddingPack.model_id == model_id)
    ):
        hit = np.flatnonzero(np.frombuffer(ids, _IDS) == study_id)
        if hit.size:
            located = (int(pack_id), str(prep), int(hit[0]))
            break
    if located is not None:
        pack = session.get(StudyEmbeddingPack, located[0])
        assert pack is not None
        ids_a, ver_a, vec_a = _arrays(pack)
        if located[1] == preprocessing_version and pack.dim == dim:  # the common case: a new version
            ver_a[located[2]] = version
            vec_a[located[2]] = new_vec
            _write(pack, ids_a, ver_a, vec_a)
            session.flush()
            return
        keep = np.arange(pack.count) != located[2]
        if keep.any():
            _write(pack, ids_a[keep], ver_a[keep], vec_a[keep])
        else:
            session.delete(pack)
        session.flush()
    _append(session, model_id, preprocessing_version, dim, study_id, version, new_vec)


def _append(session: Session, model_id: str, prep: str, dim: int, study_id: int, version: int,
            vec: np.ndarray) -> None:
    last = session.scalars(
        select(StudyEmbeddingPack)
        .where(StudyEmbeddingPack.model_id == model_id, StudyEmbeddingPack.preprocessing_version == prep)
        .order_by(StudyEmbeddingPack.pack_no.desc())
        .limit(1)
    ).one_or_none()
    if last is not None and last.dim != dim:
        raise ValueError(f"model {model_id} ({prep}) stores {last.dim}-d embeddings, not {dim}-d")
    one = (np.array([study_id]), np.array([version]), vec.reshape(1, dim))
    if last is not None and last.count < PACK_SIZE:
        ids_a, ver_a, vec_a = _arrays(last)
        _write(last, np.concatenate([ids_a, one[0]]), np.concatenate([ver_a, one[1]]), np.vstack([vec_a, one[2]]))
    else:
        pack = StudyEmbeddingPack(model_id=model_id, preprocessing_version=prep, dim=dim,
                                  pack_no=0 if last is None else last.pack_no + 1)
        _write(pack, *one)
        session.add(pack)
    session.flush()


def scan(session: Session, model_id: str, preprocessing_version: str) -> Iterator[PackChunk]:
    """Every pack of one group, in pack order, one row at a time (bounded memory).

    On PostgreSQL the rows are fetched in binary format (psycopg): ``bytea`` in the default
    text format travels hex-encoded, twice the bytes plus decoding, which made a 100,000-study
    scan about five times slower.
    """
    if session.get_bind().dialect.name == "postgresql":
        yield from _scan_postgresql_binary(session, model_id, preprocessing_version)
        return
    stmt = (
        select(StudyEmbeddingPack.count, StudyEmbeddingPack.dim, StudyEmbeddingPack.study_ids,
               StudyEmbeddingPack.versions, StudyEmbeddingPack.vectors)
        .where(StudyEmbeddingPack.model_id == model_id,
               StudyEmbeddingPack.preprocessing_version == preprocessing_version)
        .order_by(StudyEmbeddingPack.pack_no)
        .execution_options(yield_per=8)
    )
    for count, dim, ids, versions, vectors in session.execute(stmt):
        yield _chunk(int(count), int(dim), bytes(ids), bytes(versions), bytes(vectors))


def _scan_postgresql_binary(session: Session, model_id: str, preprocessing_version: str) -> Iterator[PackChunk]:
    for count, dim, ids, versions, vectors in _binary_rows(
        session, "SELECT count, dim, study_ids, versions, vectors FROM study_embedding_packs "
        "WHERE model_id = %s AND preprocessing_version = %s ORDER BY pack_no", (model_id, preprocessing_version)
    ):
        yield _chunk(int(count), int(dim), bytes(ids), bytes(versions), bytes(vectors))


def _binary_rows(session: Session, sql: str, params: tuple[object, ...]) -> Iterator[tuple[Any, ...]]:
    """Rows of ``sql`` through psycopg in binary format, in the session's transaction (see :func:`scan`)."""
    driver = session.connection().connection.driver_connection  # psycopg.Connection, same transaction
    with driver.cursor(binary=True) as cur:  # type: ignore[union-attr]
        cur.execute(sql, params)
        while rows := cur.fetchmany(8):
            yield from rows


_CODE_SQL = ("SELECT id, count, dim, study_ids, versions, codes, code_scales, norms, residual_norms "
             "FROM study_embedding_packs WHERE model_id = {m} AND preprocessing_version = {p} ORDER BY pack_no")


def scan_codes(session: Session, model_id: str, preprocessing_version: str) -> Iterator[CodeChunk]:
    """The quantized side of every pack of one group, in pack order (a quarter of :func:`scan`'s bytes)."""
    rows: Iterator[tuple[Any, ...]]  # driver values: int and bytes/memoryview
    if session.get_bind().dialect.name == "postgresql":
        rows = _binary_rows(session, _CODE_SQL.format(m="%s", p="%s"), (model_id, preprocessing_version))
    else:
        rows = iter(session.execute(text(_CODE_SQL.format(m=":m", p=":p")).execution_options(yield_per=8),
                                    {"m": model_id, "p": preprocessing_version}))
    for pack_id, count, dim, *arrays in rows:
        yield _code_chunk(int(pack_id), int(count), int(dim), *(bytes(a) for a in arrays))


def fetch_vectors(session: Session, pack_ids: list[int]) -> dict[int, PackChunk]:
    """Full float32 packs by ``id`` (only those holding possible results of a search)."""
    out: dict[int, PackChunk] = {}
    if not pack_ids:
        return out
    if session.get_bind().dialect.name == "postgresql":
        rows: Iterator[tuple[Any, ...]] = _binary_rows(
            session, "SELECT id, count, dim, study_ids, versions, vectors FROM study_embedding_packs "
            "WHERE id = ANY(%s)", (sorted(pack_ids),))
    else:  # IN lists of at most 500, below SQLite's historical 999-parameter limit
        wanted = sorted(pack_ids)
        rows = (row for start in range(0, len(wanted), 500) for row in session.execute(
            select(StudyEmbeddingPack.id, StudyEmbeddingPack.count, StudyEmbeddingPack.dim,
                   StudyEmbeddingPack.study_ids, StudyEmbeddingPack.versions, StudyEmbeddingPack.vectors)
            .where(StudyEmbeddingPack.id.in_(wanted[start : start + 500]))))
    for pack_id, count, dim, ids, versions, vectors in rows:
        out[int(pack_id)] = _chunk(int(count), int(dim), bytes(ids), bytes(versions), bytes(vectors))
    return out


def group_dims(session: Session, model_id: str) -> dict[str, tuple[int, int]]:
    """``{preprocessing_version: (dim, entries)}`` of one model's pack groups."""
    rows = session.execute(
        select(StudyEmbeddingPack.preprocessing_version, func.min(StudyEmbeddingPack.dim),
               func.max(StudyEmbeddingPack.dim), func.sum(StudyEmbeddingPack.count))
        .where(StudyEmbeddingPack.model_id == model_id)
        .group_by(StudyEmbeddingPack.preprocessing_version)
    )
    out = {}
    for prep, dmin, dmax, n in rows:
        if dmin != dmax:
            raise ValueError(f"model {model_id} ({prep}) has packs of several dimensions")
        out[str(prep)] = (int(dmin), int(n or 0))
    return out


def _from_rows(session: Session, model_id: str | None) -> dict[tuple[str, str], list[tuple[int, int, bytes]]]:
    """The invariant's content recomputed from ``study_embeddings``: group → [(study id, version, vector)]."""
    stmt = (
        select(StudyVersion.study_id, StudyVersion.version, StudyEmbedding.model_id,
               StudyEmbedding.preprocessing_version, StudyEmbedding.vector)
        .join(StudyVersion, StudyVersion.id == StudyEmbedding.study_version_id)
    )
    if model_id is not None:
        stmt = stmt.where(StudyEmbedding.model_id == model_id)
    latest: dict[tuple[int, str], tuple[int, str, bytes]] = {}
    for study_id, version, model, prep, vec in session.execute(stmt):
        key = (int(study_id), str(model))
        if key not in latest or version > latest[key][0]:
            latest[key] = (int(version), str(prep), bytes(vec))
    groups: dict[tuple[str, str], list[tuple[int, int, bytes]]] = {}
    for (study_id, model), (version, prep, vec) in sorted(latest.items()):
        groups.setdefault((model, prep), []).append((study_id, version, vec))
    return groups


def rebuild(session: Session, model_id: str | None = None) -> int:
    """Recompute the packs of one model (or all) from ``study_embeddings``; returns entries written.

    For bulk loads that bypass ``store_embedding`` and for repair after :func:`verify` fails.
    """
    if model_id is not None:
        _lock(session, model_id)
        session.execute(delete(StudyEmbeddingPack).where(StudyEmbeddingPack.model_id == model_id))
    else:
        session.execute(delete(StudyEmbeddingPack))
    written = 0
    for (model, prep), entries in _from_rows(session, model_id).items():
        dims = {len(vec) // 4 for _, _, vec in entries}
        if len(dims) != 1:
            raise ValueError(f"model {model} ({prep}) stores embeddings of several dimensions {sorted(dims)}")
        dim = dims.pop()
        for n, start in enumerate(range(0, len(entries), PACK_SIZE)):
            part = entries[start : start + PACK_SIZE]
            pack = StudyEmbeddingPack(model_id=model, preprocessing_version=prep, dim=dim, pack_no=n)
            _write(pack, np.array([e[0] for e in part]), np.array([e[1] for e in part]),
                   np.frombuffer(b"".join(e[2] for e in part), _VECTORS).reshape(len(part), dim))
            session.add(pack)
            written += len(part)
    session.flush()
    return written


def verify(session: Session, model_id: str | None = None) -> list[str]:
    """Differences between the packs and the invariant (empty when they agree)."""
    expected = {(model, prep, sid): (ver, vec) for (model, prep), entries in _from_rows(session, model_id).items()
                for sid, ver, vec in entries}
    found: dict[tuple[str, str, int], tuple[int, bytes]] = {}
    problems = []
    stmt = select(StudyEmbeddingPack)
    if model_id is not None:
        stmt = stmt.where(StudyEmbeddingPack.model_id == model_id)
    for pack in session.scalars(stmt):
        c = _chunk(pack.count, pack.dim, pack.study_ids, pack.versions, pack.vectors)
        want = quantize(c.vectors)
        got = _code_chunk(pack.id, pack.count, pack.dim, pack.study_ids, pack.versions, pack.codes, pack.code_scales,
                          pack.norms, pack.residual_norms)
        if not all(np.array_equal(a.view(np.uint8), b.view(np.uint8)) for a, b in
                   ((want.codes, got.codes), (want.scales, got.scales), (want.norms, got.norms),
                    (want.residual_norms, got.residual_norms))):
            problems.append(f"pack {pack.model_id}/{pack.preprocessing_version}/{pack.pack_no}: "
                            "codes differ from its vectors")
        for sid, ver, vec in zip(c.study_ids.tolist(), c.versions.tolist(), c.vectors, strict=True):
            key = (pack.model_id, pack.preprocessing_version, int(sid))
            if key in found:
                problems.append(f"study id {sid} appears twice in {pack.model_id}/{pack.preprocessing_version}")
            found[key] = (int(ver), vec.astype(_VECTORS).tobytes())
    for key in sorted(set(expected) | set(found)):
        if key not in found:
            problems.append(f"missing entry {key}")
        elif key not in expected:
            problems.append(f"stale entry {key}")
        elif expected[key] != found[key]:
            problems.append(f"entry {key} holds version {found[key][0]} or its vector differs "
                            f"(expected version {expected[key][0]})")
    return problems
