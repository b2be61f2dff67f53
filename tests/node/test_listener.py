"""The DICOM listener over real loopback associations (pynetdicom SCU and Debian dcmtk).

Each test starts the real SCP on a free port with a real SQLite results database and a
spool in tmp_path, sends real C-STOREs, and checks the answer, the spool and the index.

The whole module runs twice: with Locus's event-driven receive path (which reaches into
pynetdicom's private API, node.listener.transport/acceptor) and with
``dicom.event_driven_associations = false`` (pynetdicom's own association loop), so an
upgrade that breaks the private API can fall back to a listener known to work.
"""

from __future__ import annotations

import copy
import errno
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from node.db import repo
from node.db.base import Database
from node.db.ingest import BatchRecorder
from node.db.models import AuditEvent, Instance, Series
from node.listener.ae import AllowedCaller, CallerPolicy
from node.listener.index_writer import DirectorySyncError, IndexWriter, IndexWriterStopped
from node.listener.server import ListenerConfig, ListenerServer, start_listener
from node.listener.status import StoreStatus
from node.storage import LocalSpool, Watermark
from pipelines.errors import InputError
from tests.conftest import dcmtk, dcmtk_env, free_port
from tests.helpers.polling import wait_until

pytestmark = pytest.mark.network

CT_DIR = "seg-ct-liver3slice-multivendor/ct"
SEG_FILE = "seg-ct-liver3slice-multivendor/seg/dcmqi_liver.dcm"
J2K_EMPTY_UIDS = "totalseg-example/example_ct_dicom"
LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'locus.db'}")
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture
def spool(tmp_path: Path) -> LocalSpool:
    return LocalSpool(tmp_path / "spool")


_MODE = {"event_driven": True}


@pytest.fixture(autouse=True, params=[True, False], ids=["event-driven", "pynetdicom-loop"])
def association_loop(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Every listener this module starts uses the parametrized association loop."""
    _MODE["event_driven"] = bool(request.param)
    yield _MODE["event_driven"]
    _MODE["event_driven"] = True


def _start(db: Database, spool: LocalSpool, **overrides: object) -> ListenerServer:
    overrides.setdefault("event_driven", _MODE["event_driven"])
    cfg = ListenerConfig(
        ae_title="LOCUS",
        host="127.0.0.1",
        port=free_port(),
        allowed_callers=(
            AllowedCaller("TESTSCU"),
            AllowedCaller("DCMTK", ("127.0.0.1",)),
            AllowedCaller("PINNED", ("10.255.255.1",)),
        ),
        **overrides,  # type: ignore[arg-type]
    )
    return start_listener(cfg, db, spool)


@pytest.fixture
def listener(db: Database, spool: LocalSpool) -> Iterator[ListenerServer]:
    server = _start(db, spool)
    yield server
    server.shutdown()


def _scu(calling: str = "TESTSCU") -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


def _send(
    listener: ListenerServer, items: list[Path | Dataset], calling: str = "TESTSCU", *, raw: bool = False
) -> list[Dataset]:
    """C-STORE each item on one association; return the status data sets.

    ``raw=True`` sends file bytes exactly as stored after the File Meta (pynetdicom's
    chunked send), so broken payloads reach the SCP unchanged.
    """
    ae = _scu(calling)
    contexts: set[tuple[str, str]] = set()
    for item in items:
        if isinstance(item, Dataset):
            contexts.add((str(item.SOPClassUID), str(item.file_meta.TransferSyntaxUID)))
        else:
            meta = pydicom.filereader.read_file_meta_info(item)
            contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="LOCUS", max_pdu=0)
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = raw
    try:
        statuses = [assoc.send_c_store(item) for item in items]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return statuses


def _instances(db: Database) -> dict[str, SimpleNamespace]:
    """Indexed instances by SOP Instance UID (plain copies of the rows)."""
    cols = [c.key for c in Instance.__table__.columns]
    with db.session(readonly=True) as s:
        return {
            i.sop_uid: SimpleNamespace(**{c: getattr(i, c) for c in cols})
            for i in s.scalars(select(Instance))
        }


def _audit(db: Database, kind: str) -> list[dict[str, Any]]:
    """Audit events of one kind, oldest first, as detail + UID columns."""
    with db.session(readonly=True) as s:
        return [
            {**(e.detail or {}), "sop_uid": e.sop_uid, "calling_ae": e.calling_ae}
            for e in reversed(repo.audit_events(s, kind=kind))
        ]


def _rejections(db: Database) -> list[dict[str, Any]]:
    return _audit(db, "rejected")


def _spool_files(spool: LocalSpool) -> list[Path]:
    return sorted(p for p in spool.root.rglob("*") if p.is_file())


def _dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file (everything after the File Meta)."""
    with open(path, "rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        return fh.read()


def _write_part10(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------ verification


def test_listener_runs_the_parametrized_association_loop(listener: ListenerServer, association_loop: bool) -> None:
    assert getattr(listener.server, "locus_event_driven", None) is association_loop


def test_echo_with_dcmtk_and_pynetdicom(listener: ListenerServer) -> None:
    run = subprocess.run(
        [dcmtk("echoscu"), "-aet", "DCMTK", "-aec", "LOCUS", "127.0.0.1", str(listener.port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=30,
    )
    assert run.returncode == 0, run.stderr
    ae = _scu()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="LOCUS")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


# ------------------------------------------------------------------ storing


def test_dcmtk_storescu_ct_and_seg_stored_as_received_and_indexed(
    listener: ListenerServer, db: Database, spool: LocalSpool, data_dir: Path
) -> None:
    src = [data_dir / CT_DIR / n for n in ("01.dcm", "02.dcm", "03.dcm")] + [data_dir / SEG_FILE]
    run = subprocess.run(
        [dcmtk("storescu"), "-R", "-aet", "DCMTK", "-aec", "LOCUS", "--max-pdu", "131072",
         "127.0.0.1", str(listener.port), *map(str, src)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = _instances(db)
    assert len(rows) == 4 and len(_spool_files(spool)) == 4
    for path in src:
        ds = pydicom.dcmread(path)
        row = rows[ds.SOPInstanceUID]
        stored = spool.path(row.path)
        assert row.path == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        assert row.calling_ae == "DCMTK" and row.receive_count == 1
        assert row.size_bytes == stored.stat().st_size
        back = pydicom.dcmread(stored)
        assert back.file_meta.TransferSyntaxUID == row.transfer_syntax
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        # dcmtk re-encodes lengths on the wire, so compare elements, not file bytes.
        assert back == ds
        assert np.array_equal(back.pixel_array, ds.pixel_array)
    seg = pydicom.dcmread(data_dir / SEG_FILE, stop_before_pixels=True)
    seg_row = rows[seg.SOPInstanceUID]
    ct_series = pydicom.dcmread(src[0], stop_before_pixels=True).SeriesInstanceUID
    ct_sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in src[:3]}
    refs = {tuple(r) for r in seg_row.referenced_instances}
    assert {sop for _, sop in refs} == ct_sops and {ser for ser, _ in refs} == {ct_series}
    with db.session(readonly=True) as s:
        modalities = {x.modality for x in s.scalars(select(Series))}
    assert modalities == {"CT", "SEG"}


@pytest.mark.parametrize(
    ("syntax", "propose"), [(JPEG2000Lossless, "-xv"), (JPEGLSLossless, "-xt"), (RLELossless, "-xr")]
)
def test_compressed_syntaxes_stored_without_transcoding(
    listener: ListenerServer,
    db: Database,
    spool: LocalSpool,
    data_dir: Path,
    tmp_path: Path,
    syntax: str,
    propose: str,
) -> None:
    ds = pydicom.dcmread(data_dir / CT_DIR / "01.dcm")
    original = ds.pixel_array.copy()
    ds.compress(syntax)
    ds.SOPInstanceUID = generate_uid()
    path = _write_part10(ds, tmp_path / "compressed.dcm")
    # storescu proposes the compressed syntax (and uncompressed ones) and sends as stored.
    run = subprocess.run(
        [dcmtk("storescu"), propose, "-R", "-aet", "DCMTK", "-aec", "LOCUS", "127.0.0.1", str(listener.port),
         str(path)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    row = _instances(db)[ds.SOPInstanceUID]
    assert row.transfer_syntax == syntax
    back = pydicom.dcmread(spool.path(row.path))
    assert back.PixelData == ds.PixelData  # the compressed fragments, untouched
    assert np.array_equal(back.pixel_array, original)


def test_jpeg2000_with_valid_uids_and_empty_uids(
    listener: ListenerServer, db: Database, spool: LocalSpool, data_dir: Path, tmp_path: Path
) -> None:
    src = sorted((data_dir / J2K_EMPTY_UIDS).glob("*.dcm"))[0]
    # As published: the data set's SOP/Study/Series UIDs are empty (README). The command
    # carries the File Meta UID, the data set none: refused with a reason, nothing stored.
    (status,) = _send(listener, [src], raw=True)
    assert status.Status == StoreStatus.INVALID_UID
    assert "empty" in status.ErrorComment
    assert _spool_files(spool) == [] and _instances(db) == {}
    rejected = _rejections(db)
    assert rejected[0]["code"] == "invalid_uid"
    assert rejected[0]["sop_uid"] == pydicom.dcmread(src).file_meta.MediaStorageSOPInstanceUID
    # Repaired UIDs (the JPEG 2000 pixel data untouched): stored as JPEG 2000.
    ds = pydicom.dcmread(src)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    fixed = _write_part10(ds, tmp_path / "fixed.dcm")
    (status,) = _send(listener, [fixed], raw=True)
    assert status.Status == 0x0000
    row = _instances(db)[ds.SOPInstanceUID]
    assert row.transfer_syntax == JPEG2000Lossless
    assert _dataset_bytes(spool.path(row.path)) == _dataset_bytes(fixed)  # byte-for-byte as sent
    assert pydicom.dcmread(spool.path(row.path)).pixel_array.shape == (512, 512)


@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")
def test_label_map_segmentation_accepted(
    listener: ListenerServer, db: Database, data_dir: Path
) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ct = [pydicom.dcmread(data_dir / CT_DIR / n) for n in ("01.dcm", "02.dcm", "03.dcm")]
    for image in ct:
        if not image.get("SpecificCharacterSet"):  # empty in this GE CT; highdicom refuses ''
            del image.SpecificCharacterSet
    mask = np.zeros((3, 512, 512), dtype=np.uint8)
    mask[:, 200:240, 200:260] = 1
    seg = hd.seg.Segmentation(
        source_images=ct,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="lesion",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Neoplasm,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        ],
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Locus tests",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    assert seg.SOPClassUID == LABELMAP_SEG  # not in the 120-context list (dicom-guide P6)
    (status,) = _send(listener, [seg])
    assert status.Status == 0x0000
    row = _instances(db)[seg.SOPInstanceUID]
    assert row.sop_class_uid == LABELMAP_SEG
    assert {sop for _, sop in row.referenced_instances} == {d.SOPInstanceUID for d in ct}


def test_duplicate_resend_is_idempotent_and_counted(
    listener: ListenerServer, db: Database, spool: LocalSpool, data_dir: Path
) -> None:
    path = data_dir / CT_DIR / "01.dcm"
    first = _send(listener, [path])
    again = _send(listener, [path, path])
    assert [s.Status for s in first + again] == [0, 0, 0]
    rows = _instances(db)
    assert len(rows) == 1 and next(iter(rows.values())).receive_count == 3
    assert len(_spool_files(spool)) == 1
    assert [e["new"] for e in _audit(db, "received")] == [True, False, False]


def test_parallel_associations(database: Database, spool: LocalSpool, data_dir: Path) -> None:
    """Four concurrent associations, on SQLite and PostgreSQL (``database`` fixture)."""
    db = database
    listener = _start(db, spool)
    base = pydicom.dcmread(data_dir / CT_DIR / "01.dcm")
    study, errors = generate_uid(), []

    def worker(n: int) -> None:
        try:
            items = []
            series = generate_uid()
            for k in range(5):
                ds = copy.deepcopy(base)
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
                ds.InstanceNumber = k + 1
                items.append(ds)
            statuses = _send(listener, items)
            assert [s.Status for s in statuses] == [0] * 5
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    listener.shutdown()
    assert not errors
    rows = _instances(db)
    assert len(rows) == 20 and all(r.receive_count == 1 for r in rows.values())
    assert len(_spool_files(spool)) == 20


# ------------------------------------------------------------------ refusals


def test_unknown_calling_ae_rejected_and_audited(
    listener: ListenerServer, db: Database, spool: LocalSpool, data_dir: Path
) -> None:
    run = subprocess.run(
        [dcmtk("storescu"), "-aet", "STRANGER", "-aec", "LOCUS", "127.0.0.1", str(listener.port),
         str(data_dir / CT_DIR / "01.dcm")],
        env=dcmtk_env(), capture_output=True, text=True, timeout=30,
    )
    assert run.returncode != 0
    assert "Calling AE Title Not Recognized" in run.stdout + run.stderr
    ae = _scu("PINNED")  # allowed only from 10.255.255.1
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="LOCUS")
    assert assoc.is_rejected and not assoc.is_established
    ae = _scu()
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="NOT-LOCUS")  # wrong called AE
    assert assoc.is_rejected
    codes = sorted((r["code"], r["calling_ae"]) for r in _rejections(db))
    assert codes == [
        ("called_ae_not_recognized", "TESTSCU"),
        ("calling_ae_not_allowed", "STRANGER"),
        ("calling_host_not_allowed", "PINNED"),
    ]
    assert all(r["peer_host"] == "127.0.0.1" for r in _rejections(db))
    assert _spool_files(spool) == [] and _instances(db) == {}


def test_caller_policy_rules() -> None:
    policy = CallerPolicy(
        "LOCUS",
        (AllowedCaller.parse("A"), AllowedCaller.parse("B@10.0.0.0/8,192.168.1.5"), AllowedCaller.parse("C@localhost")),
    )
    assert policy.check("A", "LOCUS", "203.0.113.9") is None
    assert policy.check("B", "LOCUS", "10.1.2.3") is None
    assert policy.check("B", "LOCUS", "::ffff:192.168.1.5") is None
    assert policy.check("B", "LOCUS", "192.168.1.6").code == "calling_host_not_allowed"
    assert policy.check("C", "LOCUS", "127.0.0.1") is None
    assert policy.check("Z", "LOCUS", "127.0.0.1").code == "calling_ae_not_allowed"
    assert policy.check("A", "OTHER", "127.0.0.1").code == "called_ae_not_recognized"
    assert CallerPolicy("LOCUS").check("anyone", "LOCUS", "1.2.3.4") is None
    with pytest.raises(ValueError):
        AllowedCaller.parse("@host")


def _broken_file(src: Path, tmp_path: Path, name: str, body: bytes) -> Path:
    """A Part 10 file with the real File Meta of ``src`` and ``body`` as its data set."""
    with open(src, "rb") as fh:
        pydicom.filereader.read_preamble(fh, False)
        pydicom.filereader._read_file_meta_info(fh)
        meta_end = fh.tell()
    out = tmp_path / name
    out.write_bytes(src.read_bytes()[:meta_end] + body)
    return out


def test_truncated_and_non_dicom_payloads_refused(
    listener: ListenerServer, db: Database, spool: LocalSpool, data_dir: Path, tmp_path: Path
) -> None:
    src = data_dir / CT_DIR / "01.dcm"
    body = _dataset_bytes(src)
    items = [
        _broken_file(src, tmp_path, "cut-pixels.dcm", body[: len(body) - 1000]),  # mid Pixel Data
        _broken_file(src, tmp_path, "cut-header.dcm", body[:333]),  # mid element
        _broken_file(src, tmp_path, "garbage.dcm", b"%PDF-1.7 this is not DICOM at all" * 40),
    ]
    statuses = _send(listener, items, raw=True)
    assert [s.Status for s in statuses] == [StoreStatus.CANNOT_UNDERSTAND] * 3
    assert all("truncated" in s.ErrorComment or "not a data set" in s.ErrorComment
               or "invalid VR" in s.ErrorComment for s in statuses)
    assert _spool_files(spool) == [] and _instances(db) == {}
    assert [r["code"] for r in _rejections(db)] == ["malformed_dataset"] * 3
    # The listener is unharmed: a good file on the same port still stores.
    assert _send(listener, [src])[0].Status == 0x0000


def test_uid_mismatches_between_command_and_data_set(
    listener: ListenerServer, db: Database, spool: LocalSpool, data_dir: Path, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(data_dir / CT_DIR / "01.dcm")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # command UID ≠ data set UID
    other_instance = tmp_path / "inst.dcm"
    ds.save_as(other_instance, enforce_file_format=False)  # keeps the altered File Meta
    ds = pydicom.dcmread(data_dir / CT_DIR / "01.dcm")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.128"  # PET in the data set, CT in the command
    other_class = tmp_path / "class.dcm"
    ds.save_as(other_class, enforce_file_format=False)  # keeps the CT File Meta
    statuses = _send(listener, [other_instance, other_class], raw=True)
    assert [s.Status for s in statuses] == [StoreStatus.SOP_INSTANCE_MISMATCH, StoreStatus.SOP_CLASS_MISMATCH]
    assert _spool_files(spool) == []
    assert [r["code"] for r in _rejections(db)] == ["sop_instance_mismatch", "sop_class_mismatch"]


def test_disk_watermark_answers_out_of_resources(
    db: Database, tmp_path: Path, data_dir: Path
) -> None:
    spool = LocalSpool(tmp_path / "full", watermark=Watermark(min_free_bytes=1 << 62))
    with _start(db, spool) as server:
        statuses = _send(server, [data_dir / CT_DIR / "01.dcm", data_dir / SEG_FILE])
    assert [s.Status for s in statuses] == [StoreStatus.OUT_OF_RESOURCES] * 2
    assert "watermark" in statuses[0].ErrorComment
    assert _spool_files(spool) == [] and _instances(db) == {}
    assert [r["code"] for r in _rejections(db)] == ["disk_watermark"] * 2


def test_index_failure_never_answers_success(tmp_path: Path, data_dir: Path) -> None:
    # A database without the schema: every write fails after the file is written.
    broken = Database(f"sqlite:///{tmp_path / 'empty.db'}")
    spool = LocalSpool(tmp_path / "spool")
    src = data_dir / CT_DIR / "01.dcm"
    with _start(broken, spool) as server:
        (status,) = _send(server, [src])
    assert status.Status == StoreStatus.INDEX_UNAVAILABLE
    files = _spool_files(spool)
    assert len(files) == 1  # the file stays; a resend is indexed idempotently
    broken.upgrade()
    with _start(broken, spool) as server:
        (status,) = _send(server, [src])
    assert status.Status == 0x0000
    assert _spool_files(spool) == files and len(_instances(broken)) == 1
    broken.dispose()


def test_uid_conflict_refused_and_new_copy_removed(
    listener: ListenerServer, db: Database, spool: LocalSpool, data_dir: Path
) -> None:
    ds = pydicom.dcmread(data_dir / CT_DIR / "01.dcm")
    assert _send(listener, [ds])[0].Status == 0
    ds.SeriesInstanceUID = generate_uid()  # same SOP Instance UID under another series
    (status,) = _send(listener, [ds])
    assert status.Status == StoreStatus.UID_CONFLICT
    assert len(_spool_files(spool)) == 1
    assert _rejections(db)[0]["code"] == "uid_conflict"


def test_settings_adapter(tmp_path: Path) -> None:
    from node.settings import LocusSettings

    settings = LocusSettings.load(
        storage={"data_dir": str(tmp_path), "disk_watermark_percent": 95, "min_free_bytes": 0},
        dicom={"ae_title": "NODE", "port": 11999, "allowed_callers": [{"ae_title": "PACS", "host": "10.0.0.7"}]},
    )
    cfg = ListenerConfig.from_settings(settings)
    assert cfg.ae_title == "NODE" and cfg.port == 11999
    assert cfg.allowed_callers == (AllowedCaller("PACS", ("10.0.0.7",)),)
    spool = LocalSpool.from_settings(settings.storage)
    assert spool.root == (tmp_path / "spool").resolve()
    assert spool.watermark.min_free_fraction == pytest.approx(0.05)



# ------------------------------------------------------------------ group commit (index_writer)

GC_STUDY = "1.2.826.0.1.3680043.10.77.1"
GC_SERIES = "1.2.826.0.1.3680043.10.77.2"
NOW = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)


def _rec(n: int, *, series: str = GC_SERIES) -> repo.InstanceRecord:
    sop = f"{GC_SERIES}.{n}"
    return repo.InstanceRecord(
        study_uid=GC_STUDY, series_uid=series, sop_uid=sop, sop_class_uid=str(CTImageStorage),
        modality="CT", transfer_syntax="1.2.840.10008.1.2.1", path=f"{GC_STUDY}/{series}/{sop}.dcm",
        size_bytes=1000, calling_ae="TESTSCU", instance_number=n,
    )


def _row_counts(db: Database) -> tuple[int, int, int]:
    """(instances, studies, received audit rows), read on another connection."""
    from node.db.models import Study

    with db.session(readonly=True) as s:
        return (
            len(list(s.scalars(select(Instance.id)))),
            len(list(s.scalars(select(Study.id)))),
            len(list(s.scalars(select(AuditEvent.id).where(AuditEvent.kind == "received")))),
        )


class _CommitGate:
    """Holds the writer inside its next COMMIT until released; can make commits fail."""

    def __init__(self, db: Database) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail: Exception | None = None
        # The writer commits on a DBAPI connection (node.db.ingest.BatchRecorder), so the
        # gate wraps the recorder's commit step rather than a SQLAlchemy event.
        self._original = BatchRecorder._commit
        gate = self

        def gated_commit(recorder: BatchRecorder, raw: Any, cur: Any) -> None:
            gate.entered.set()
            assert gate.release.wait(20), "test never released the commit"
            if gate.fail is not None:
                raise gate.fail
            gate._original(recorder, raw, cur)

        BatchRecorder._commit = gated_commit  # type: ignore[method-assign]

    def remove(self) -> None:
        BatchRecorder._commit = self._original  # type: ignore[method-assign]


def _record_in_threads(
    writer: IndexWriter, records: list[repo.InstanceRecord]
) -> tuple[dict[int, Any], list[threading.Thread]]:
    results: dict[int, Any] = {}

    def call(i: int, rec: repo.InstanceRecord) -> None:
        try:
            results[i] = writer.record(rec, NOW)
        except Exception as exc:  # the answer a C-STORE would turn into a status
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i, r)) for i, r in enumerate(records)]
    for t in threads:
        t.start()
    return results, threads


def test_group_commit_answers_each_store_only_after_its_commit(db: Database) -> None:
    gate = _CommitGate(db)
    writer = IndexWriter(db)
    try:
        first, t0 = _record_in_threads(writer, [_rec(0)])
        assert gate.entered.wait(10)  # batch 1 (record 0) is inside COMMIT, held there
        rest, ts = _record_in_threads(writer, [_rec(n) for n in range(1, 8)])
        wait_until(lambda: writer.waiting >= 7, "the seven records queued behind the held commit")
        assert first == {} and rest == {}  # nobody is answered before the commit
        assert _row_counts(db) == (0, 0, 0)  # and nothing is visible before it either
        gate.release.set()
        for t in t0 + ts:
            t.join(10)
    finally:
        gate.remove()
        writer.close()
    assert isinstance(first[0], repo.RecordOutcome) and first[0].new
    assert all(isinstance(r, repo.RecordOutcome) and r.new for r in rest.values()) and len(rest) == 7
    assert _row_counts(db) == (8, 1, 8)
    assert (writer.batches, writer.records) == (2, 8)  # the seven waiting records: one transaction
    with db.session(readonly=True) as s:
        series = s.scalars(select(Series)).one()
        assert series.instance_count == 8


def test_group_commit_failure_fails_every_waiting_store_and_indexes_nothing(db: Database) -> None:
    gate = _CommitGate(db)
    gate.fail = RuntimeError("disk I/O error (injected)")
    writer = IndexWriter(db)
    try:
        first, t0 = _record_in_threads(writer, [_rec(0)])
        assert gate.entered.wait(10)
        rest, ts = _record_in_threads(writer, [_rec(n) for n in range(1, 6)])
        wait_until(lambda: writer.waiting >= 5, "5 records queued behind the held commit")
        gate.release.set()
        for t in t0 + ts:
            t.join(10)
        answers = [first[0], *rest.values()]
        assert len(answers) == 6 and all(isinstance(a, RuntimeError) for a in answers)
        assert _row_counts(db) == (0, 0, 0)  # rolled back as a whole: nothing half-indexed

        gate.fail = None  # the writer survives a failed batch; a resend is indexed
        assert writer.record(_rec(0), NOW).new
    finally:
        gate.remove()
        writer.close()
    assert _row_counts(db) == (1, 1, 1)


def test_group_commit_refused_record_is_undone_alone(db: Database) -> None:
    writer = IndexWriter(db)
    try:
        assert writer.record(_rec(1), NOW).new
        gate = _CommitGate(db)
        try:
            held, t0 = _record_in_threads(writer, [_rec(2)])
            assert gate.entered.wait(10)
            # Same SOP Instance UID as record 1 under another series: uid_conflict.
            batch, ts = _record_in_threads(writer, [_rec(3), _rec(1, series=GC_SERIES + ".9"), _rec(4)])
            wait_until(lambda: writer.waiting >= 3, "3 records queued behind the held commit")
            gate.release.set()
            for t in t0 + ts:
                t.join(10)
        finally:
            gate.remove()
    finally:
        writer.close()
    assert held[0].new and batch[0].new and batch[2].new
    assert isinstance(batch[1], InputError) and batch[1].code == "uid_conflict"
    assert sorted(_instances(db)) == [f"{GC_SERIES}.{n}" for n in (1, 2, 3, 4)]
    with db.session(readonly=True) as s:  # the refused record left no series behind
        assert [x.series_uid for x in s.scalars(select(Series))] == [GC_SERIES]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_refused_record_alone_in_its_batch_leaves_nothing(
    backend: str, db: Database, request: pytest.FixtureRequest
) -> None:
    # A batch of one runs without a savepoint; its refusal rolls the whole transaction
    # back, including the series row created before the conflict was found.
    database = db if backend == "sqlite" else Database(request.getfixturevalue("pg_schema_url"))
    if backend != "sqlite":
        database.upgrade()
    recorder = BatchRecorder(database)
    try:
        (first,) = recorder.record_batch([(_rec(1), NOW, None)])
        assert isinstance(first, repo.RecordOutcome) and first.new
        (refused,) = recorder.record_batch([(_rec(1, series=GC_SERIES + ".9"), NOW, None)])
        assert isinstance(refused, InputError) and refused.code == "uid_conflict"
        (second,) = recorder.record_batch([(_rec(2), NOW, None)])  # the connection is still usable
        assert isinstance(second, repo.RecordOutcome) and second.new
    finally:
        recorder.close()
    assert _row_counts(database) == (2, 1, 2)
    with database.session(readonly=True) as s:
        assert [x.series_uid for x in s.scalars(select(Series))] == [GC_SERIES]
    if backend != "sqlite":
        database.dispose()


def test_group_commit_directory_sync_failure_and_stopped_writer(db: Database) -> None:
    def broken_sync(relpath: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    writer = IndexWriter(db, sync_parent=broken_sync)
    with pytest.raises(DirectorySyncError, match="fsync of spool directory"):
        writer.record(_rec(1), NOW, relpath_to_sync=_rec(1).path)
    assert _row_counts(db) == (0, 0, 0)
    writer.close()
    assert not writer.running
    with pytest.raises(IndexWriterStopped):
        writer.record(_rec(2), NOW)


def test_listener_answers_failure_to_every_store_of_a_failed_group_commit(
    db: Database, spool: LocalSpool, data_dir: Path
) -> None:
    """Through real associations: a failed index transaction is 0xA701 for each, no row."""
    gate = _CommitGate(db)
    gate.fail = RuntimeError("database is locked (injected)")
    gate.release.set()
    base = pydicom.dcmread(data_dir / CT_DIR / "01.dcm")
    statuses: list[int] = []

    def send(n: int) -> None:
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = f"{GC_SERIES}.{n}", generate_uid()
        statuses.extend(int(s.Status) for s in _send(server, [ds]))

    try:
        with _start(db, spool) as server:
            threads = [threading.Thread(target=send, args=(n,)) for n in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
    finally:
        gate.remove()
    assert statuses == [StoreStatus.INDEX_UNAVAILABLE] * 3
    assert _instances(db) == {}


def test_listener_directory_sync_failure_answers_out_of_resources(
    db: Database, spool: LocalSpool, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_sync(relpath: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool, "sync_parent", broken_sync)
    with _start(db, spool) as server:
        (status,) = _send(server, [data_dir / CT_DIR / "01.dcm"])
    assert status.Status == StoreStatus.OUT_OF_RESOURCES
    assert "spool sync failed" in status.ErrorComment
    assert _instances(db) == {}
    assert [r["code"] for r in _rejections(db)] == ["write_failed"]


# ------------------------------------------------------------------ listener processes (hand-off)


def test_listener_processes_take_turns_and_a_dead_one_is_restarted(
    db: Database, spool: LocalSpool, data_dir: Path
) -> None:
    server = _start(db, spool, processes=2)
    template = pydicom.dcmread(data_dir / CT_DIR / "01.dcm")

    def send_one() -> str:
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = generate_uid()
        assert _send(server, [ds])[0].Status == 0
        return str(ds.SOPInstanceUID)

    try:
        assert server.children is not None and len(server.children.pids) == 1
        (child,) = server.children.pids
        assert server.context.writer is not None
        sent = [send_one() for _ in range(4)]  # turns: parent, child, parent, child
        assert server.children.handed_off == 2
        assert server.context.writer.records == 2  # the other two were indexed by the child
        assert set(_instances(db)) == set(sent)

        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and child in server.children.pids:
            time.sleep(0.05)
        sent += [send_one(), send_one()]  # the dead child's turn goes back to the parent
        assert server.children.handed_off == 2

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.children.pids in ([], [child]):
            time.sleep(0.2)
        (restarted,) = server.children.pids
        assert restarted != child
        sent += [send_one(), send_one()]
        assert server.children.handed_off == 3  # the restarted child serves its turns again
        assert set(_instances(db)) == set(sent)
    finally:
        server.shutdown()
    assert server.children.pids == []


def test_file_meta_encoded_as_pynetdicom_would() -> None:
    """The hand-encoded File Meta group equals pydicom's encoding of pynetdicom's file_meta."""
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from node.listener.handlers import file_meta_bytes

    for sop_class, sop, ts in (
        (str(CTImageStorage), "1.2.3.4", "1.2.840.10008.1.2.1"),  # odd-length UIDs: NUL padded
        ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.3.45", "1.2.840.10008.1.2"),
        (LABELMAP_SEG, generate_uid(), str(JPEG2000Lossless)),
    ):
        meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop, transfer_syntax=ts)
        assert file_meta_bytes(sop_class, sop, ts) == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)



def _hold_write_lock(db_file: Path, seconds: float) -> threading.Thread:
    """Another process's writer, as far as SQLite can tell: a second connection that
    holds the write lock (BEGIN IMMEDIATE) for ``seconds``."""
    import sqlite3

    other = sqlite3.connect(db_file, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    def release() -> None:
        time.sleep(seconds)
        other.execute("COMMIT")
        other.close()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


def test_writer_waits_for_a_lock_held_by_another_writer_then_commits(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'shared.db'}", sqlite_busy_timeout_ms=10_000)
    database.upgrade()
    recorder = BatchRecorder(database)
    try:
        holder = _hold_write_lock(tmp_path / "shared.db", 0.3)
        (outcome,) = recorder.record_batch([(_rec(0), NOW, None)])  # retried until the lock is free
        holder.join()
        assert isinstance(outcome, repo.RecordOutcome) and outcome.new
        assert _row_counts(database) == (1, 1, 1)
        # The pooled connection gets the engine's busy timeout back when the recorder lets go.
        recorder.close()
        with database.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 10_000
    finally:
        recorder.close()
        database.dispose()


def test_writer_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'shared.db'}", sqlite_busy_timeout_ms=100)
    database.upgrade()
    recorder = BatchRecorder(database)
    holder = _hold_write_lock(tmp_path / "shared.db", 1.0)
    try:
        with pytest.raises(Exception, match="locked"):
            recorder.record_batch([(_rec(0), NOW, None)])
    finally:
        holder.join()
        recorder.close()
        database.dispose()
    # Nothing was indexed: the C-STORE would be answered 0xA701 and resent.
    check = Database(f"sqlite:///{tmp_path / 'shared.db'}")
    assert _row_counts(check) == (0, 0, 0)
    check.dispose()
