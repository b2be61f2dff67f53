"""Per-slice embeddings of one series, serialised so SQLite and PostgreSQL store them the same way.

CLEAR keeps one float32 HDF5 matrix per patient with no row metadata (CLEAR's published code).
Locus stores, per series and encoder, a :class:`SliceFeatures` record whose columns are plain
portable types (the SQL table itself is the node's business):

============  ===========  ==========================================================
field         SQL type     content
============  ===========  ==========================================================
model_id      text         registry id of the slice encoder (weights + preprocessing)
format        text         ``"locus-clear-features-1"``
dtype         text         ``"<f2"``: little-endian IEEE float16, fixed
shape         text (JSON)  ``[n_slices, feature_dim]``
features      bytes        row-major ``n_slices × feature_dim × 2`` bytes
z_mm          bytes        ``<f4`` patient z of each row (slice index ↔ z)
ct_index      bytes        ``<i4`` nearest stored CT slice of each row (−1 none)
sha256        text         of ``features`` (detects truncation in transit or at rest)
============  ===========  ==========================================================

``bytes`` is ``BLOB`` in SQLite and ``bytea`` in PostgreSQL; nothing depends on the
database's array or float types, so a row copied between them is bit-identical.
Size per study: ``n_slices × feature_dim × 2 + 8 · n_slices`` bytes — a 1.8 m whole body at
3 mm is ~600 rows: 600 × 512 × 2 ≈ 600 KiB with the ResNet-18 encoder (512-d).
:meth:`SliceFeatures.pack` gives the same content as one self-describing blob for the spool.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.errors import InputError

STORE_FORMAT = "locus-clear-features-1"
FEATURE_DTYPE = "<f2"
_MAGIC = b"LCSF1\0"


class FeatureStoreError(InputError):
    """A stored feature record is malformed (truncated, wrong dtype, inconsistent shape)."""

    code = "clear_features_corrupt"


@dataclass(frozen=True)
class SliceFeatures:
    """Embeddings of every slice of one series by one encoder (rows in slice-index order)."""

    model_id: str
    features: np.ndarray  # float16 [S, D]
    z_mm: np.ndarray  # float32 [S]
    ct_index: np.ndarray  # int32 [S]

    def __post_init__(self) -> None:
        f = np.asarray(self.features)
        if f.ndim != 2:
            raise FeatureStoreError(f"features must be 2-D [slices, dim], got shape {f.shape}")
        if f.dtype != np.float16:
            raise FeatureStoreError(f"features must be float16, got {f.dtype}")
        if np.asarray(self.z_mm).shape != (f.shape[0],) or np.asarray(self.ct_index).shape != (f.shape[0],):
            raise FeatureStoreError("z_mm and ct_index need one entry per feature row")
        if not self.model_id:
            raise FeatureStoreError("feature record without a model id")

    @property
    def n_slices(self) -> int:
        """Number of feature rows (one per rendered slice)."""
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Width of one feature row (the encoder's feature dimension)."""
        return int(self.features.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes stored for this record's arrays (the documented size per study)."""
        return self.n_slices * self.dim * 2 + self.n_slices * 8

    def to_record(self) -> dict[str, Any]:
        """Column values for a SQL row (str, bytes only)."""
        data = np.ascontiguousarray(self.features, dtype=FEATURE_DTYPE).tobytes()
        return {
            "model_id": self.model_id,
            "format": STORE_FORMAT,
            "dtype": FEATURE_DTYPE,
            "shape": json.dumps([self.n_slices, self.dim]),
            "features": data,
            "z_mm": np.ascontiguousarray(self.z_mm, dtype="<f4").tobytes(),
            "ct_index": np.ascontiguousarray(self.ct_index, dtype="<i4").tobytes(),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SliceFeatures:
        """Inverse of :meth:`to_record`; every length and the digest are checked."""
        try:
            fmt, dtype = record["format"], record["dtype"]
            shape = json.loads(record["shape"])
            data, z, ct = bytes(record["features"]), bytes(record["z_mm"]), bytes(record["ct_index"])
            model_id, digest = str(record["model_id"]), str(record["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FeatureStoreError(f"feature record lacks or garbles a field: {exc!r}") from exc
        if fmt != STORE_FORMAT:
            raise FeatureStoreError(f"unknown feature store format {fmt!r} (expected {STORE_FORMAT})")
        if dtype != FEATURE_DTYPE:
            raise FeatureStoreError(f"feature dtype {dtype!r} is not {FEATURE_DTYPE}")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v >= 0 for v in shape)):
            raise FeatureStoreError(f"feature shape {shape!r} is not [slices, dim]")
        n, d = shape
        if len(data) != n * d * 2 or len(z) != n * 4 or len(ct) != n * 4:
            raise FeatureStoreError(f"feature record byte lengths do not match shape {shape}")
        if hashlib.sha256(data).hexdigest() != digest:
            raise FeatureStoreError("feature bytes do not match their sha256")
        return cls(
            model_id=model_id,
            features=np.frombuffer(data, dtype=FEATURE_DTYPE).reshape(n, d).astype(np.float16),
            z_mm=np.frombuffer(z, dtype="<f4").astype(np.float32),
            ct_index=np.frombuffer(ct, dtype="<i4").astype(np.int32),
        )

    def pack(self) -> bytes:
        """One blob: magic, 4-byte header length, JSON header (text fields), then the three byte fields."""
        rec = self.to_record()
        header: dict[str, object] = {k: v for k, v in rec.items() if isinstance(v, str)}
        header["lengths"] = [len(rec["features"]), len(rec["z_mm"]), len(rec["ct_index"])]
        hb = json.dumps(header, sort_keys=True).encode()
        return _MAGIC + struct.pack("<I", len(hb)) + hb + rec["features"] + rec["z_mm"] + rec["ct_index"]

    @classmethod
    def unpack(cls, blob: bytes) -> SliceFeatures:
        """Parse a blob written by :meth:`pack`, checking magic, lengths and the features' SHA-256."""
        if blob[: len(_MAGIC)] != _MAGIC or len(blob) < len(_MAGIC) + 4:
            raise FeatureStoreError("not a Locus CLEAR feature blob")
        off = len(_MAGIC)
        (hl,) = struct.unpack("<I", blob[off : off + 4])
        off += 4
        try:
            header = json.loads(blob[off : off + hl])
            lengths = [int(v) for v in header.pop("lengths")]
        except (ValueError, KeyError, TypeError) as exc:
            raise FeatureStoreError(f"feature blob header unreadable: {exc!r}") from exc
        off += hl
        if len(blob) != off + sum(lengths):
            raise FeatureStoreError("feature blob is truncated or has trailing bytes")
        parts = []
        for n in lengths:
            parts.append(blob[off : off + n])
            off += n
        header.update(features=parts[0], z_mm=parts[1], ct_index=parts[2])
        return cls.from_record(header)
