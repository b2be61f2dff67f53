"""C-STORE policies over real associations, on SQLite and PostgreSQL.

* Own instances (issue: endless report loop): a Locus SR sent back by the PACS — this
  node's (SOP Instance UID in the reports table, or under ``analysis.uid_root``) or
  another Locus's (equipment identity) — is stored and indexed but makes no study
  version and does not count toward completeness; another vendor's SR still does.
* A SOP Instance UID received again with different content: ``keep_first`` (default)
  or ``replace`` (a new study version), WARNING log, ``duplicate`` audit row, counted.
* ``dicom.max_instance_bytes``: a larger data set is refused with 0xA700, nothing written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from node import completion
from node.db import repo
from node.db.base import Database
from node.db.models import Study, StudyVersion, StudyVersionInstance
from node.listener.handlers import LOCUS_DEVICES, same_content
from node.listener.server import ListenerConfig, ListenerServer
from node.listener.status import StoreStatus
from node.settings import CompletionSettings, LocusSettings
from node.storage import LocalSpool
from tests.node.test_listener import CT_DIR, _audit, _instances, _rejections, _send, _spool_files, _start

pytestmark = pytest.mark.network

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
UID_ROOT = "1.2.826.0.1.3680043.10.4242"
# Every rule fires as soon as the sweep runs (no quiet periods): the tests decide when.
NOW_RULES = CompletionSettings(series_quiet_s=0, study_quiet_s=0, force_complete_s=1, sweep_interval_s=1)


@pytest.fixture
def spool(tmp_path: Path) -> LocalSpool:
    return LocalSpool(tmp_path / "spool")


@pytest.fixture
def listener(database: Database, spool: LocalSpool, request: pytest.FixtureRequest) -> Iterator[ListenerServer]:
    overrides = getattr(request, "param", {})
    server = _start(database, spool, **overrides)
    yield server
    server.shutdown()


def _ct(data_dir: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted((data_dir / CT_DIR).glob("*.dcm"))]


def _sr(study: Dataset, *, sop_uid: str | None = None, manufacturer: str = "ACME", model: str = "Reporter") -> Dataset:
    """A small SR in ``study`` (a report as a PACS would forward it back)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = COMPREHENSIVE_3D_SR
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.PatientID = study.get("PatientID", "")
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    return ds


def _sweep(db: Database, now: datetime) -> list[int]:
    with db.session() as s:
        return completion.sweep(s, now, NOW_RULES)


def _study(db: Database, study_uid: str) -> Study:
    with db.session(readonly=True) as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        s.expunge(study)
        return study


def _version_sops(db: Database, version_id: int) -> set[str]:
    from node.db.models import Instance

    with db.session(readonly=True) as s:
        return set(
            s.scalars(
                select(Instance.sop_uid)
                .join(StudyVersionInstance, StudyVersionInstance.instance_id == Instance.id)
                .where(StudyVersionInstance.study_version_id == version_id)
            )
        )


def _versions(db: Database, study_uid: str) -> list[int]:
    with db.session(readonly=True) as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        return list(s.scalars(select(StudyVersion.version).where(StudyVersion.study_id == study.id)))


def _later() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=5)


def _analysed_with_report(db: Database, version_id: int, sr_uid: str) -> None:
    """Version ``version_id`` analysed, its SR ``sr_uid`` in the reports table (as a worker leaves it)."""
    now = datetime.now(UTC)
    with db.session() as s:
        assert repo.claim_analysis(s, version_id, now)
        repo.store_analysis_result(
            s, version_id, {}, [],
            {"sr_sop_uid": sr_uid, "series_uid": str(generate_uid()), "path": f"{sr_uid}.dcm", "predecessor": None},
            now,
        )


# ------------------------------------------------------------------ own instances


@pytest.mark.parametrize("listener", [{"own_uid_root": UID_ROOT}], indirect=True)
def test_own_srs_are_indexed_but_make_no_version_other_vendors_do(
    listener: ListenerServer, database: Database, data_dir: Path
) -> None:
    ct = _ct(data_dir)
    study_uid = str(ct[0].StudyInstanceUID)
    assert [s.Status for s in _send(listener, ct)] == [0] * len(ct)
    (v1,) = _sweep(database, _later())
    our_sr_uid = generate_uid()
    _analysed_with_report(database, v1, our_sr_uid)
    before = _study(database, study_uid)

    own = [
        _sr(ct[0], sop_uid=our_sr_uid),  # this node's SR, forwarded back by the PACS (reports table)
        _sr(ct[0], sop_uid=generate_uid(prefix=UID_ROOT + ".")),  # under this node's UID root
        _sr(ct[0], manufacturer=LOCUS_DEVICES[0][0], model=LOCUS_DEVICES[0][1]),  # another Locus's SR
    ]
    assert [s.Status for s in _send(listener, own + own)] == [0] * 6  # and each resent once
    rows = _instances(database)
    assert [rows[str(d.SOPInstanceUID)].origin for d in own] == ["own"] * 3
    assert _sweep(database, _later() + timedelta(seconds=5)) == []
    after = _study(database, study_uid)
    assert after.pending_since is None and not after.has_late_instances
    assert (after.instance_count, after.last_received_at) == (before.instance_count, before.last_received_at)
    assert _versions(database, study_uid) == [1]
    with database.session(readonly=True) as s:
        detail = repo.study_detail(s, study_uid)
    assert detail is not None and detail["own_instances"] == 3 and detail["instances"] == len(ct)

    # Another vendor's SR is input, as before: it makes version 2 (without the own SRs).
    theirs = _sr(ct[0])
    assert _send(listener, [theirs])[0].Status == 0
    assert _instances(database)[str(theirs.SOPInstanceUID)].origin == "received"
    (v2,) = _sweep(database, _later() + timedelta(seconds=10))
    assert _versions(database, study_uid) == [1, 2]
    assert _version_sops(database, v2) == {str(d.SOPInstanceUID) for d in ct} | {str(theirs.SOPInstanceUID)}


def test_own_sr_of_an_unknown_study_makes_no_version(
    listener: ListenerServer, database: Database, data_dir: Path
) -> None:
    """A copy from another Locus, for a study this node never received."""
    study = Dataset()
    study.StudyInstanceUID = generate_uid()
    sr = _sr(study, manufacturer=LOCUS_DEVICES[0][0], model=LOCUS_DEVICES[0][1])
    assert _send(listener, [sr])[0].Status == 0
    assert _sweep(database, _later()) == []
    assert _study(database, str(study.StudyInstanceUID)).pending_since is None
    assert _instances(database)[str(sr.SOPInstanceUID)].origin == "own"


def test_locus_devices_match_the_sr_device_identity() -> None:
    from pipelines.analysis import DEFAULT_DEVICE

    assert (DEFAULT_DEVICE.manufacturer, DEFAULT_DEVICE.model_name) in LOCUS_DEVICES


# ------------------------------------------------------------------ duplicates


def _changed(ds: Dataset) -> Dataset:
    """The same SOP instance with other content (another pixel value and description)."""
    other = ds
    arr = bytearray(other.PixelData)
    arr[0] ^= 0x01
    other.PixelData = bytes(arr)
    other.SeriesDescription = "changed by the sender"
    return other


def test_duplicate_with_different_content_keep_first(
    listener: ListenerServer, database: Database, spool: LocalSpool, data_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = pydicom.dcmread(data_dir / CT_DIR / "01.dcm")
    sop, study_uid = str(first.SOPInstanceUID), str(first.StudyInstanceUID)
    assert _send(listener, [first, first])[0].Status == 0  # a plain resend is no conflict
    (path,) = _spool_files(spool)
    stored = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="node.listener.handlers"):
        (status,) = _send(listener, [_changed(pydicom.dcmread(data_dir / CT_DIR / "01.dcm"))])
    assert status.Status == 0x0000
    assert _spool_files(spool) == [path] and path.read_bytes() == stored  # new bytes not written
    row = _instances(database)[sop]
    assert row.receive_count == 3 and row.size_bytes == len(stored) and row.path.endswith(f"{sop}.dcm")
    assert _study(database, study_uid).duplicate_count == 1
    (audit,) = _audit(database, "duplicate")
    assert audit["duplicate"] == "keep_first" and audit["sop_uid"] == sop
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("keep_first" in m and sop in m and study_uid in m for m in warnings), warnings


@pytest.mark.parametrize("listener", [{"duplicate_policy": "replace"}], indirect=True)
def test_duplicate_with_different_content_replace_makes_a_new_version(
    listener: ListenerServer, database: Database, spool: LocalSpool, data_dir: Path
) -> None:
    ct = _ct(data_dir)
    study_uid = str(ct[0].StudyInstanceUID)
    assert [s.Status for s in _send(listener, ct)] == [0] * len(ct)
    (v1,) = _sweep(database, _later())
    first_files = _spool_files(spool)
    original = first_files[0].read_bytes()
    target = next(d for d in ct if str(d.SOPInstanceUID) in first_files[0].name)
    sop = str(target.SOPInstanceUID)

    changed = _changed(pydicom.dcmread(target.filename))
    assert [s.Status for s in _send(listener, [changed, changed])] == [0, 0]  # the retry finds its copy
    row = _instances(database)[sop]
    files = _spool_files(spool)
    assert len(files) == len(first_files) + 1 and first_files[0].read_bytes() == original  # first copy kept
    replacement = spool.path(row.path)
    assert replacement in files and replacement != first_files[0]
    assert pydicom.dcmread(replacement).SeriesDescription == "changed by the sender"
    study = _study(database, study_uid)
    # The retry is a plain resend of the (now indexed) replacement: counted once.
    assert study.pending_since is not None and study.has_late_instances and study.duplicate_count == 1
    (v2,) = _sweep(database, _later() + timedelta(seconds=5))
    assert _versions(database, study_uid) == [1, 2] and sop in _version_sops(database, v2)
    assert [a["duplicate"] for a in _audit(database, "duplicate")] == ["replace"]
    assert v1 != v2


def test_transcoded_copy_is_the_same_object(data_dir: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(data_dir / CT_DIR / "01.dcm")
    files = {}
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = ts
        out = tmp_path / f"{ts}.dcm"
        ds.save_as(out, implicit_vr=ts == ImplicitVRLittleEndian, little_endian=True, enforce_file_format=True)
        files[ts] = out.read_bytes()
    implicit = pydicom.dcmread(tmp_path / f"{ImplicitVRLittleEndian}.dcm")
    raw = files[ImplicitVRLittleEndian][implicit.file_meta.FileMetaInformationGroupLength + 144 :]
    assert same_content(files[ExplicitVRLittleEndian], ExplicitVRLittleEndian, files[ImplicitVRLittleEndian], raw,
                        ImplicitVRLittleEndian)
    ds.SeriesDescription = "other"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, implicit_vr=True, little_endian=True, enforce_file_format=True)
    blob = changed.read_bytes()
    assert not same_content(files[ExplicitVRLittleEndian], ExplicitVRLittleEndian, blob, b"", ImplicitVRLittleEndian)


# ------------------------------------------------------------------ size limit


def test_instance_over_the_size_limit_refused_nothing_written(
    database: Database, spool: LocalSpool, data_dir: Path
) -> None:
    big = pydicom.dcmread(data_dir / CT_DIR / "01.dcm")
    small = _sr(big)
    limit = 64 * 1024  # the CT slice (512×512×2 bytes of pixels) is larger, the SR is not
    with _start(database, spool, max_instance_bytes=limit) as server:
        statuses = _send(server, [big, small])
    assert statuses[0].Status == StoreStatus.OUT_OF_RESOURCES == 0xA700
    assert "max_instance_bytes" in statuses[0].ErrorComment
    assert statuses[1].Status == 0
    assert set(_instances(database)) == {str(small.SOPInstanceUID)}
    assert [p.name for p in _spool_files(spool)] == [f"{small.SOPInstanceUID}.dcm"]
    (rejection,) = _rejections(database)
    assert rejection["code"] == "instance_too_large" and rejection["sop_uid"] == str(big.SOPInstanceUID)


# ------------------------------------------------------------------ settings


def test_store_policy_settings_take_effect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = ListenerConfig.from_settings(LocusSettings.load(storage={"data_dir": str(tmp_path)}))
    assert defaults.max_instance_bytes == 2 * 1024**3 and defaults.duplicate_policy == "keep_first"
    assert defaults.own_uid_root is None
    monkeypatch.setenv("LOCUS_DICOM__MAX_INSTANCE_BYTES", "1000")
    monkeypatch.setenv("LOCUS_DICOM__DUPLICATE_POLICY", "replace")
    monkeypatch.setenv("LOCUS_ANALYSIS__UID_ROOT", UID_ROOT + ".")
    cfg = ListenerConfig.from_settings(LocusSettings.load(storage={"data_dir": str(tmp_path)}))
    assert (cfg.max_instance_bytes, cfg.duplicate_policy, cfg.own_uid_root) == (1000, "replace", UID_ROOT)
    monkeypatch.setenv("LOCUS_DICOM__DUPLICATE_POLICY", "keep_last")
    with pytest.raises(ValueError, match="duplicate_policy"):
        LocusSettings.load(storage={"data_dir": str(tmp_path)})
    monkeypatch.setenv("LOCUS_DICOM__DUPLICATE_POLICY", "replace")
    monkeypatch.setenv("LOCUS_ANALYSIS__UID_ROOT", "1.02.3")
    with pytest.raises(ValueError, match="uid_root"):
        LocusSettings.load(storage={"data_dir": str(tmp_path)})


# ------------------------------------------------------------------ migration


def test_migration_0005_keeps_existing_rows_received_and_uncounted(db_url: str) -> None:
    from sqlalchemy import text

    db = Database(db_url)
    try:
        db.upgrade("0003")
        now = datetime(2026, 12, 1, tzinfo=UTC)
        with db.session() as s:  # rows as a 0003 node wrote them (no origin column yet)
            s.execute(text(
                "INSERT INTO studies (study_uid, status, first_received_at, last_received_at, instance_count,"
                " latest_version, has_late_instances) VALUES ('1.2.3', 'receiving', :t, :t, 1, 0, false)"
            ), {"t": now})
            s.execute(text(
                "INSERT INTO series (study_id, series_uid, modality, sop_class_uid, instance_count,"
                " first_received_at, last_received_at) SELECT id, '1.2.3.1', 'CT', '1.2.840.10008.5.1.4.1.1.2', 1,"
                " :t, :t FROM studies"
            ), {"t": now})
            s.execute(text(
                "INSERT INTO instances (series_id, sop_uid, sop_class_uid, transfer_syntax, path, size_bytes,"
                " received_at, last_received_at, receive_count) SELECT id, '1.2.3.1.1', '1.2.840.10008.5.1.4.1.1.2',"
                " '1.2.840.10008.1.2.1', 'a/b/c.dcm', 10, :t, :t, 1 FROM series"
            ), {"t": now})
        db.upgrade()
        with db.session(readonly=True) as s:
            assert s.execute(text("SELECT origin FROM instances")).scalar_one() == "received"
            assert s.execute(text("SELECT duplicate_count FROM studies")).scalar_one() == 0
        with db.engine.connect() as conn:
            from alembic import command

            from node.db.base import alembic_config

            command.downgrade(alembic_config(conn), "0003")
            conn.commit()
        assert db.current_revision() == "0003"
    finally:
        db.dispose()


def test_replacement_copies_have_their_own_validated_spool_name(tmp_path: Path) -> None:
    from node.storage import relpath_for

    spool = LocalSpool(tmp_path / "spool")
    first = spool.put_atomic("1.2.3", "1.2.3.4", "1.2.3.4.5", b"first")
    second = spool.put_atomic("1.2.3", "1.2.3.4", "1.2.3.4.5", b"second", variant="0123abcd")
    assert (first, second) == ("1.2.3/1.2.3.4/1.2.3.4.5.dcm", "1.2.3/1.2.3.4/1.2.3.4.5.0123abcd.dcm")
    assert spool.path(first).read_bytes() == b"first" and spool.path(second).read_bytes() == b"second"
    for bad in ("../x", "ABC", "", "12/34"):
        with pytest.raises(ValueError, match="variant"):
            relpath_for("1.2.3", "1.2.3.4", "1.2.3.4.5", bad)
