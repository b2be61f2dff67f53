"""Exact nearest-study search by cosine similarity over stored HLIP study embeddings.

Only embeddings from the **same model** (``model_id``) and the same preprocessing version
are compared: vectors of different checkpoints live in different spaces.  Each study counts
once, with the embedding of its latest version that has one from that model.

The candidates are read from the packed copy of the embeddings
(:mod:`node.db.embedding_packs`, 128 vectors per row) in two passes: the int8 codes of every
pack give each candidate an interval guaranteed to hold its exact float32 score
(:mod:`node.db.embedding_codes`); only the candidates whose interval reaches the k-th best
lower bound are re-scored, by the float32 matrix-vector product over their packs.  The result
is the exact one (the re-scoring is the same computation as scoring every vector), while a
query reads about a quarter of the bytes: ~200 MB of float32 took 0.6 s from PostgreSQL at
100,000 x 512 (``tests/benchmarks/bench_similarity.py``).  Ties are broken by Study Instance
UID, which is looked up only for the rows that can make the top k.  An approximate index is
future work; at this scale it would only add error.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from node.db import Session
from node.db import embedding_codes as codes
from node.db import embedding_packs as packs
from node.db import embeddings as q
from pipelines.errors import InputError

log = logging.getLogger(__name__)

#: How :func:`find_similar` scores: int8-code bounds then exact re-scoring, or every float32 vector.
Strategy = Literal["codes", "full"]


@dataclass(frozen=True)
class SimilarStudy:
    """One study found similar, with its cosine similarity to the query."""
    study_uid: str
    version: int
    similarity: float  # cosine, in [-1, 1]


@dataclass(frozen=True)
class SimilarityResult:
    """The answer of a similarity query, with what was compared so it can be reproduced."""
    query_study_uid: str
    query_version: int
    model_id: str
    preprocessing_version: str
    candidates: int  # studies compared (query excluded)
    excluded_other_preprocessing: int
    results: list[SimilarStudy] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    rescored: int = 0  # candidates scored from their float32 vectors (all of them unless the codes ruled most out)


def as_matrix(rows: Sequence[q.StoredVector], dim: int) -> np.ndarray:
    """Stack stored float32 LE vectors into an ``[N, dim]`` matrix (not normalised; see :func:`cosine`)."""
    if any(len(r.vector) != 4 * dim or r.dim != dim for r in rows):
        raise InputError(f"stored embeddings do not all have dimension {dim}", code="embedding_dim_mismatch")
    mat = np.frombuffer(b"".join(r.vector for r in rows), dtype="<f4").reshape(len(rows), dim)
    return mat if sys.byteorder == "little" else mat.astype(np.float32)  # pragma: no branch


def cosine(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row with ``query`` without copying the matrix (zero rows score 0)."""
    with np.errstate(invalid="ignore", over="ignore"):  # float32 overflow of absurd vectors gives inf/nan scores
        norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
        qn = float(np.linalg.norm(query))
        dots = matrix @ query.astype(np.float32)
        return np.divide(dots, norms * qn, out=np.zeros_like(dots), where=(norms > 0) & (qn > 0))


def candidates_at_least_kth(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of every score that ties with or beats the k-th best (all of them if fewer)."""
    if k <= 0 or scores.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    if k >= scores.shape[0]:
        return np.arange(scores.shape[0])
    kth = np.partition(scores, scores.shape[0] - k)[scores.shape[0] - k]
    return np.flatnonzero(scores >= kth)


def top_k(scores: np.ndarray, k: int, keys: Sequence[str]) -> list[tuple[int, float]]:
    """Exact top-k entries of ``scores``; ties ordered by ``keys`` (every row tied with the k-th is kept
    until the tie-break, so the order does not depend on ``argpartition``)."""
    ordered = sorted(candidates_at_least_kth(scores, k).tolist(), key=lambda i: (-float(scores[i]), keys[i]))[:k]
    return [(i, float(scores[i])) for i in ordered]


def find_similar(session: Session, study_uid: str, *, k: int = 10, model_id: str | None = None,
                 strategy: Strategy = "codes") -> SimilarityResult:  # fmt: skip
    """Nearest studies to ``study_uid`` by cosine similarity of their latest embeddings from one model.

    ``strategy="codes"`` (default) bounds every candidate from the int8 codes and re-scores in
    float32 only those that can reach the top k; ``"full"`` scores every float32 vector.  Both
    return the same result, bit for bit: the re-scoring is the full path's own computation.
    """
    t0 = time.perf_counter()
    own = q.study_vectors(session, study_uid)
    if model_id is not None:
        own = [r for r in own if r.model_id == model_id]
    if not own:
        which = f" from model {model_id}" if model_id else ""
        raise InputError(f"study {study_uid} has no stored embedding{which}", code="no_embedding")
    if len(own) > 1:
        raise InputError(f"study {study_uid} has embeddings from several models "
                         f"({', '.join(r.model_id for r in own)}); choose one with --model", code="ambiguous_model")  # fmt: skip
    ref = own[0]
    query = as_matrix([ref], ref.dim)[0]
    own_id = q.study_id(session, study_uid)
    groups = packs.group_dims(session, ref.model_id)
    if groups.get(ref.preprocessing_version, (ref.dim, 0))[0] != ref.dim:
        raise InputError(f"stored embeddings of {ref.model_id} do not all have dimension {ref.dim}",
                         code="embedding_dim_mismatch")  # fmt: skip
    excluded = sum(n for prep, (_, n) in groups.items() if prep != ref.preprocessing_version)
    t1 = time.perf_counter()
    scored, scored_by = None, "codes"
    if strategy == "codes" and codes.query_direction(query) is not None:
        scored = _scan_codes(session, ref, query, own_id, k)
    if scored is None:  # "full", a query the codes cannot bound, or packs changed under the scan
        scored, scored_by = _scan_full(session, ref, query, own_id), "full"
    ids, versions, scores, candidates = scored
    rescored = candidates if scored_by == "full" else int(scores.shape[0])
    t2 = time.perf_counter()
    cand = candidates_at_least_kth(scores, k)
    uids = q.study_uids(session, ids[cand].tolist())
    missing = sorted(set(ids[cand].tolist()) - set(uids))
    if missing:  # the packs name a study that no longer exists: a broken invariant, not a result
        raise InputError(f"embedding packs of {ref.model_id} reference unknown studies {missing[:3]}; "
                         "rebuild them (node.db.embedding_packs.rebuild)", code="embedding_index_stale")  # fmt: skip
    hits = top_k(scores[cand], k, [uids[int(i)] for i in ids[cand]])
    t3 = time.perf_counter()
    return SimilarityResult(
        query_study_uid=study_uid,
        query_version=ref.version,
        model_id=ref.model_id,
        preprocessing_version=ref.preprocessing_version,
        candidates=candidates,
        excluded_other_preprocessing=excluded,
        results=[SimilarStudy(uids[int(ids[cand[i]])], int(versions[cand[i]]), s) for i, s in hits],
        timings_s={"load_s": t1 - t0, "scan_score_s": t2 - t1, "top_k_s": t3 - t2},
        rescored=rescored,
    )


#: ``(study ids, versions, exact scores, number of candidates)``; the arrays may hold only the
#: candidates that can make the top k.
_Scored = tuple[np.ndarray, np.ndarray, np.ndarray, int]


def _scan_full(session: Session, ref: q.StoredVector, query: np.ndarray, own_id: int | None) -> _Scored:
    """Every candidate's exact float32 score, pack by pack."""
    ids_parts, version_parts, score_parts = [], [], []
    for chunk in packs.scan(session, ref.model_id, ref.preprocessing_version):
        ids_parts.append(chunk.study_ids)
        version_parts.append(chunk.versions)
        score_parts.append(cosine(chunk.vectors, query))
    ids = np.concatenate(ids_parts) if ids_parts else np.empty(0, np.int64)
    versions = np.concatenate(version_parts) if version_parts else np.empty(0, np.int32)
    scores = np.concatenate(score_parts) if score_parts else np.empty(0, np.float32)
    keep = ids != own_id
    return ids[keep], versions[keep], scores[keep], int(keep.sum())


def _scan_codes(session: Session, ref: q.StoredVector, query: np.ndarray, own_id: int | None,
                k: int) -> _Scored | None:  # fmt: skip
    """Exact scores of the candidates whose bound interval reaches the k-th best lower bound.

    Any other candidate has k candidates scoring at least that lower bound, which is above its
    own score: it cannot be in the top k, ties with the k-th included (they are all kept).
    The survivors are re-scored by :func:`cosine` over their whole float32 pack, exactly as
    :func:`_scan_full` scores them.  None when a pack changed between the two reads
    (PostgreSQL READ COMMITTED: the study ids or versions moved, or a survivor's exact score is
    outside its interval): the caller then scans in full, in one statement.
    """
    direction = codes.query_direction(query)
    assert direction is not None
    parts: dict[str, list[np.ndarray]] = {key: [] for key in
                                          ("pack", "pos", "ids", "ver", "dots", "scales", "norms", "res")}  # fmt: skip
    for chunk in packs.scan_codes(session, ref.model_id, ref.preprocessing_version):  # per pack: one product
        count = chunk.study_ids.shape[0]
        for key, part in (("pack", np.full(count, chunk.pack_id, np.int64)), ("pos", np.arange(count)),
                          ("ids", chunk.study_ids), ("ver", chunk.versions),
                          ("dots", codes.code_dots(chunk.codes, direction)), ("scales", chunk.scales),
                          ("norms", chunk.norms), ("res", chunk.residual_norms)):  # fmt: skip
            parts[key].append(part)
    if not parts["ids"]:
        return np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float32), 0
    a = {key: np.concatenate(p) for key, p in parts.items()}
    keep = a["ids"] != own_id
    a = {key: v[keep] for key, v in a.items()}
    pack_of, pos, ids, versions = a["pack"], a["pos"], a["ids"], a["ver"]
    lo, hi = codes.bounds(a["dots"], a["scales"], a["norms"], a["res"], ref.dim)
    n = int(ids.shape[0])
    if 0 < k < n:
        kth_lo = np.partition(lo, n - k)[n - k]
        survive = np.flatnonzero(hi >= kth_lo)
    else:
        survive = np.arange(n) if k > 0 else np.empty(0, np.int64)
    fetched = packs.fetch_vectors(session, np.unique(pack_of[survive]).tolist())
    scores = np.empty(survive.shape[0], np.float32)
    for pack_id, pack in fetched.items():
        sel = np.flatnonzero(pack_of[survive] == pack_id)
        at = pos[survive[sel]]
        if at.size and (at.max() >= pack.study_ids.shape[0] or
                        not np.array_equal(pack.study_ids[at], ids[survive[sel]]) or
                        not np.array_equal(pack.versions[at], versions[survive[sel]])):  # fmt: skip
            return None
        exact = cosine(pack.vectors, query)[at]
        if np.isnan(exact).any():  # a non-finite stored vector: let the full scan rank it, as it always has
            return None
        if not ((lo[survive[sel]] <= exact) & (exact <= hi[survive[sel]])).all():
            log.warning("similarity: codes of pack %d do not bound its vectors (rewritten during the query?); "
                        "scanning %s in full", pack_id, ref.model_id)  # fmt: skip
            return None
        scores[sel] = exact
    if len(fetched) != np.unique(pack_of[survive]).shape[0]:
        return None  # a pack was deleted or rewritten in between
    return ids[survive], versions[survive], scores, n
