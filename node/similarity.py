"""Exact nearest-study search by cosine similarity over stored HLIP study embeddings.

Only embeddings from the **same model** (``model_id``) and the same preprocessing version
are compared: vectors of different checkpoints live in different spaces.  Each study counts
once, with the embedding of its latest version that has one from that model.

The candidates are read from the packed copy of the embeddings
(:mod:`node.db.embedding_packs`, 128 vectors per row) and scored pack by pack with a float32
matrix-vector product, keeping only the scores: exact, bounded memory, and at 100,000 x 512
well under the 200 ms target on SQLite (``tests/benchmarks/bench_similarity.py``).  Top-k
uses ``argpartition``; ties are broken by Study Instance UID, which is looked up only for
the rows that can make the top k.  An approximate index is future work; at this scale it
would only add error.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from node.db import Session
from node.db import embedding_packs as packs
from node.db import embeddings as q
from pipelines.errors import InputError



@dataclass(frozen=True)
class SimilarStudy:
    study_uid: str
    version: int
    similarity: float  # cosine, in [-1, 1]


@dataclass(frozen=True)
class SimilarityResult:
    query_study_uid: str
    query_version: int
    model_id: str
    preprocessing_version: str
    candidates: int  # studies compared (query excluded)
    excluded_other_preprocessing: int
    results: list[SimilarStudy] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)


def as_matrix(rows: Sequence[q.StoredVector], dim: int) -> np.ndarray:
    """Stack stored float32 LE vectors into an ``[N, dim]`` matrix (not normalised; see :func:`cosine`)."""
    if any(len(r.vector) != 4 * dim or r.dim != dim for r in rows):
        raise InputError(f"stored embeddings do not all have dimension {dim}", code="embedding_dim_mismatch")
    mat = np.frombuffer(b"".join(r.vector for r in rows), dtype="<f4").reshape(len(rows), dim)
    return mat if sys.byteorder == "little" else mat.astype(np.float32)  # pragma: no branch


def cosine(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row with ``query`` without copying the matrix (zero rows score 0)."""
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


def find_similar(session: Session, study_uid: str, *, k: int = 10, model_id: str | None = None) -> SimilarityResult:
    """Nearest studies to ``study_uid`` by cosine similarity of their latest embeddings from one model."""
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
    ids_parts, version_parts, score_parts = [], [], []
    for chunk in packs.scan(session, ref.model_id, ref.preprocessing_version):
        ids_parts.append(chunk.study_ids)
        version_parts.append(chunk.versions)
        score_parts.append(cosine(chunk.vectors, query))
    ids = np.concatenate(ids_parts) if ids_parts else np.empty(0, np.int64)
    versions = np.concatenate(version_parts) if version_parts else np.empty(0, np.int32)
    scores = np.concatenate(score_parts) if score_parts else np.empty(0, np.float32)
    keep = ids != own_id
    ids, versions, scores = ids[keep], versions[keep], scores[keep]
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
        candidates=int(scores.shape[0]),
        excluded_other_preprocessing=excluded,
        results=[SimilarStudy(uids[int(ids[cand[i]])], int(versions[cand[i]]), s) for i, s in hits],
        timings_s={"load_s": t1 - t0, "scan_score_s": t2 - t1, "top_k_s": t3 - t2},
    )
