"""Feature store serialisation: bit-exact round trips (also through SQLite BLOB and PostgreSQL bytea), size, damage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.models.clear.store import FEATURE_DTYPE, FeatureStoreError, SliceFeatures


def _features(n: int = 7, d: int = 5) -> SliceFeatures:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, d)).astype(np.float16)
    f[0, 0] = np.float16(65504.0)  # float16 max survives
    f[1, 1] = np.float16(-0.0)
    return SliceFeatures("clear-enc-abc", f, np.linspace(-100, 80, n).astype(np.float32), np.arange(n, dtype=np.int32) - 1)


def _same(a: SliceFeatures, b: SliceFeatures) -> None:
    assert a.model_id == b.model_id
    assert a.features.tobytes() == b.features.tobytes() and b.features.dtype == np.float16
    np.testing.assert_array_equal(a.z_mm, b.z_mm)
    np.testing.assert_array_equal(a.ct_index, b.ct_index)


def test_record_round_trip_is_bit_exact_and_portable_types() -> None:
    f = _features()
    rec = f.to_record()
    assert all(isinstance(v, str | bytes) for v in rec.values())  # BLOB/bytea + text only
    assert rec["dtype"] == FEATURE_DTYPE and json.loads(rec["shape"]) == [7, 5]
    assert len(rec["features"]) == 7 * 5 * 2
    _same(f, SliceFeatures.from_record(rec))
    _same(f, SliceFeatures.from_record({**rec, "features": memoryview(rec["features"])}))  # psycopg gives memoryview


def test_pack_round_trip_and_size() -> None:
    f = _features(600, 512)
    blob = f.pack()
    _same(f, SliceFeatures.unpack(blob))
    assert f.nbytes == 600 * 512 * 2 + 600 * 8
    assert len(blob) - f.nbytes < 1024  # header overhead only


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: {**r, "features": r["features"][:-2]},
        lambda r: {**r, "dtype": "<f4"},
        lambda r: {**r, "shape": "[7, 6]"},
        lambda r: {**r, "sha256": "0" * 64},
        lambda r: {**r, "format": "other"},
        lambda r: {k: v for k, v in r.items() if k != "z_mm"},
    ],
)
def test_damaged_records_are_refused(damage) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FeatureStoreError):
        SliceFeatures.from_record(damage(_features().to_record()))


def test_damaged_blobs_and_bad_arrays_are_refused() -> None:
    blob = _features().pack()
    for bad in (blob[:-1], blob + b"x", b"junk" + blob):
        with pytest.raises(FeatureStoreError):
            SliceFeatures.unpack(bad)
    with pytest.raises(FeatureStoreError):
        SliceFeatures("m", np.zeros((3, 2), np.float32), np.zeros(3, np.float32), np.zeros(3, np.int32))
    with pytest.raises(FeatureStoreError):
        SliceFeatures("m", np.zeros((3, 2), np.float16), np.zeros(2, np.float32), np.zeros(3, np.int32))


def _check_db_round_trip(conn, placeholder: str, blob_type: str) -> None:  # type: ignore[no-untyped-def]
    f = _features(40, 16)
    rec = f.to_record()
    cols = list(rec)
    cur = conn.cursor()
    types = ", ".join(f"{c} {blob_type if isinstance(rec[c], bytes) else 'TEXT'}" for c in cols)
    cur.execute(f"CREATE TEMP TABLE clear_features_rt ({types})")
    cur.execute(f"INSERT INTO clear_features_rt ({', '.join(cols)}) VALUES ({', '.join([placeholder] * len(cols))})",
                [rec[c] for c in cols])  # fmt: skip
    cur.execute(f"SELECT {', '.join(cols)} FROM clear_features_rt")
    row = dict(zip(cols, cur.fetchone(), strict=True))
    _same(f, SliceFeatures.from_record(row))


def test_sqlite_blob_round_trip() -> None:
    import sqlite3

    conn = sqlite3.connect(":memory:")
    try:
        _check_db_round_trip(conn, "?", "BLOB")
    finally:
        conn.close()


def test_postgresql_bytea_round_trip() -> None:
    import os

    psycopg = pytest.importorskip("psycopg")
    dsn = os.environ.get("LOCUS_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3")
    try:
        conn = psycopg.connect(dsn)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    try:
        _check_db_round_trip(conn, "%s", "BYTEA")
    finally:
        conn.rollback()
        conn.close()
