"""Study embedding packs: a packed copy of the searchable study embeddings.

Exact similar-study search reads, per model, the latest embedding of every study; one 2 KB
vector per row made that one database page per study.  ``study_embedding_packs`` holds the
same vectors 128 to a row (see ``node.db.embedding_packs`` for the invariant), plus their int8
codes with per-vector scale, norm and residual norm (``node.db.embedding_codes``): the search's
first pass reads those, a quarter of the bytes.  The upgrade fills it from the existing
``study_embeddings`` rows; the downgrade drops it (the rows stay).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Fixed here (not imported from node.db) so this revision stays what it was when written.
PACK_SIZE = 128


def _le(typecode: str, values: Sequence[int]) -> bytes:
    arr = array(typecode, values)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        arr.byteswap()
    return arr.tobytes()


def _codes(vectors: bytes, count: int, dim: int) -> dict[str, bytes]:
    """Frozen copy of ``node.db.embedding_codes.quantize`` (``embedding_packs.verify`` checks they agree)."""
    v = np.frombuffer(vectors, "<f4").reshape(count, dim).astype(np.float64)
    finite = np.asarray(np.isfinite(v).all(axis=1))
    v = np.where(finite[:, None], v, 0.0)
    scales = (np.abs(v).max(axis=1) / 127).astype(np.float32)
    s = scales.astype(np.float64)
    codes = np.clip(np.rint(v / np.where(s > 0, s, 1.0)[:, None]), -127, 127)
    residual = v - s[:, None] * codes
    res = np.sqrt(np.einsum("ij,ij->i", residual, residual)) * (1 + 1e-12)
    res32 = res.astype(np.float32)
    res32 = np.where(res32.astype(np.float64) < res, np.nextafter(res32, np.float32(np.inf)), res32)
    res32 = np.where(finite, res32, np.float32(np.inf)).astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", v, v)).astype(np.float32)
    return {"codes": codes.astype("i1").tobytes(), "code_scales": scales.astype("<f4").tobytes(),
            "norms": norms.astype("<f4").tobytes(), "residual_norms": res32.astype("<f4").tobytes()}  # fmt: skip


def upgrade() -> None:
    packs = op.create_table(
        "study_embedding_packs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("preprocessing_version", sa.String(length=64), nullable=False),
        sa.Column("pack_no", sa.Integer(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("study_ids", sa.LargeBinary(), nullable=False),
        sa.Column("versions", sa.LargeBinary(), nullable=False),
        # codes before vectors: SQLite reads a column through the overflow pages of those before it
        sa.Column("codes", sa.LargeBinary(), nullable=False),
        sa.Column("code_scales", sa.LargeBinary(), nullable=False),
        sa.Column("norms", sa.LargeBinary(), nullable=False),
        sa.Column("residual_norms", sa.LargeBinary(), nullable=False),
        sa.Column("vectors", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_embedding_packs")),
        sa.UniqueConstraint("model_id", "preprocessing_version", "pack_no",
                            name=op.f("uq_study_embedding_packs_model_id_preprocessing_version_pack_no")),
    )  # fmt: skip
    # Backfill: the latest embedded version of every study, per model (vectors are already
    # float32 little-endian bytes; they are concatenated unchanged).
    rows = op.get_bind().execute(sa.text(
        "SELECT sv.study_id, sv.version, e.model_id, e.preprocessing_version, e.dim, e.vector "
        "FROM study_embeddings e JOIN study_versions sv ON sv.id = e.study_version_id"
    ))  # fmt: skip
    latest: dict[tuple[int, str], tuple[int, str, int, bytes]] = {}
    for study_id, version, model_id, prep, dim, vector in rows:
        key = (int(study_id), str(model_id))
        if key not in latest or version > latest[key][0]:
            latest[key] = (int(version), str(prep), int(dim), bytes(vector))
    groups: dict[tuple[str, str], list[tuple[int, int, int, bytes]]] = {}
    for (study_id, model_id), (version, prep, dim, vector) in sorted(latest.items()):
        groups.setdefault((model_id, prep), []).append((study_id, version, dim, vector))
    out = []
    for (model_id, prep), entries in groups.items():
        dims = {e[2] for e in entries}
        if len(dims) != 1:
            raise RuntimeError(f"study embeddings of {model_id} ({prep}) have several dimensions {sorted(dims)}")
        for n, start in enumerate(range(0, len(entries), PACK_SIZE)):
            part = entries[start : start + PACK_SIZE]
            out.append({"model_id": model_id, "preprocessing_version": prep, "pack_no": n, "dim": part[0][2],
                        "count": len(part), "study_ids": _le("q", [e[0] for e in part]),
                        "versions": _le("i", [e[1] for e in part]), "vectors": b"".join(e[3] for e in part),
                        **_codes(b"".join(e[3] for e in part), len(part), part[0][2])})  # fmt: skip
    if out:
        op.bulk_insert(packs, out)


def downgrade() -> None:
    op.drop_table("study_embedding_packs")
