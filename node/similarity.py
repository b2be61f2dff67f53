"""Exact nearest-study search by cosine similarity over stored HLIP study embeddings.

Only embeddings from the **same model** (``model_id``) and the same preprocessing version
are compared: vectors of different checkpoints live in different spaces.  The search is a
brute-force float32 matrix product (``N x D`` by ``D``) plus ``argpartition``: exact, and at
100,000 x 512 a few tens of milliseconds on one core.  An approximate index is future work; at
this scale it would only add error.  Ties are broken by Study Instance UID so results are
reproducible.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from node.db import Session
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


def top_k(scores: np.ndarray, k: int, keys: Sequence[str]) -> list[tuple[int, float]]:
    """Exact top-k entries of ``scores``; ties ordered by ``keys``."""
    if k <= 0 or scores.shape[0] == 0:
        return []
    k = min(k, scores.shape[0])
    if k < scores.shape[0]:
        # keep every row tied with the k-th score so the UID tie-break is exact
        kth = np.partition(scores, scores.shape[0] - k)[scores.shape[0] - k]
        idx = np.flatnonzero(scores >= kth)
    else:
        idx = np.arange(scores.shape[0])
    ordered = sorted(idx.tolist(), key=lambda i: (-float(scores[i]), keys[i]))[:k]
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
    rows = q.model_vectors(session, ref.model_id)
    t1 = time.perf_counter()
    same = [r for r in rows if r.preprocessing_version == ref.preprocessing_version and r.study_uid != study_uid]
    excluded = sum(1 for r in rows if r.preprocessing_version != ref.preprocessing_version)
    scores = cosine(as_matrix(same, ref.dim), as_matrix([ref], ref.dim)[0])
    t2 = time.perf_counter()
    hits = top_k(scores, k, [r.study_uid for r in same])
    t3 = time.perf_counter()
    return SimilarityResult(
        query_study_uid=study_uid,
        query_version=ref.version,
        model_id=ref.model_id,
        preprocessing_version=ref.preprocessing_version,
        candidates=len(same),
        excluded_other_preprocessing=excluded,
        results=[SimilarStudy(same[i].study_uid, same[i].version, s) for i, s in hits],
        timings_s={"load_s": t1 - t0, "matrix_cosine_s": t2 - t1, "top_k_s": t3 - t2},
    )
