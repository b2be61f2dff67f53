"""Results database: migrations, repository functions and the `locus results` / `locus db` CLI.

Every test runs on SQLite and PostgreSQL (``database`` fixture in conftest.py).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from node.cli_db import db as db_group
from node.cli_results import results as results_group
from node.db import Database, repo
from node.db.base import Base, alembic_config
from node.db.models import (
    Analysis,
    AuditEvent,
    Export,
    ExportAttempt,
    Instance,
    Lesion,
    Series,
    Study,
    StudyEmbedding,
    StudyVersion,
)
from node.settings import LocusSettings
from pipelines.errors import InputError
from pipelines.findings import (
    AnalysisResult,
    BoundingBox,
    CodedValue,
    Flag,
    LesionMeasurements,
    Localization,
    ModelInfo,
    RankedLabel,
    SiteAssignment,
    SuvInfo,
    SuvKind,
)
from pipelines.findings import (
    Lesion as LesionFinding,
)

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
STUDY = "1.2.826.0.1.3680043.10.1.1"
CT_SERIES = "1.2.826.0.1.3680043.10.1.2"
PET_SERIES = "1.2.826.0.1.3680043.10.1.3"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_IMAGE = "1.2.840.10008.5.1.4.1.1.128"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def rec(
    sop: str, *, series: str = CT_SERIES, study: str = STUDY, modality: str = "CT", **kw: object
) -> repo.InstanceRecord:
    values: dict[str, object] = {
        "study_uid": study,
        "series_uid": series,
        "sop_uid": sop,
        "sop_class_uid": CT_IMAGE if modality == "CT" else PET_IMAGE,
        "modality": modality,
        "transfer_syntax": EXPLICIT_LE,
        "path": f"{study}/{series}/{sop}.dcm",
        "size_bytes": 1000,
        "calling_ae": "MODALITY1",
        "frame_of_reference_uid": "1.2.3.4.5",
    }
    values.update(kw)
    return repo.InstanceRecord(**values)  # type: ignore[arg-type]


def audit_kinds(database: Database, kind: str | None = None) -> list[str]:
    with database.session() as s:
        q = select(AuditEvent.kind).order_by(AuditEvent.id)
        if kind:
            q = q.where(AuditEvent.kind == kind)
        return list(s.scalars(q))


def received_version(database: Database, n_ct: int = 3, now: datetime = T0) -> int:
    """A study with ``n_ct`` CT instances declared complete as version 1; returns its id."""
    with database.session() as s:
        for i in range(n_ct):
            repo.record_instance(s, rec(f"{CT_SERIES}.{i + 1}", instance_number=i + 1), now)
    with database.session() as s:
        (study_id,) = repo.pending_study_ids(s)
        snap = repo.lock_study(s, study_id)
        assert snap is not None
        vid = repo.create_study_version(s, snap, rule="quiet_timer", reason="test", now=now + timedelta(minutes=2))
        assert vid is not None
        return vid


def lesion_finding(lesion_id: str = "S1", segment: int = 1) -> LesionFinding:
    model = ModelInfo(model_id="hclal-test", name="localizer", version="1", sha256="ab" * 32)
    site = SiteAssignment(site_id="liver", name="Liver", code=CodedValue("10200004", "SCT", "Liver"))
    return LesionFinding(
        lesion_id=lesion_id,
        seg_sop_instance_uid="1.2.826.0.1.3680043.10.1.9.1",
        segment_number=segment,
        component=None,
        segment_label=f"Lesion {segment}",
        property_category=CodedValue("49755003", "SCT", "Morphologically Altered Structure"),
        property_type=CodedValue("108369006", "SCT", "Neoplasm"),
        tracking_id=f"lesion-{segment}",
        tracking_uid=f"1.2.826.0.1.3680043.10.1.8.{segment}",
        measurements=LesionMeasurements(
            voxel_count=27, volume_ml=3.375, suv_max=12.5, suv_mean=7.25, suv_peak=9.0, tlg=24.47, ct_mean_hu=41.0
        ),
        bbox=BoundingBox(center_mm=(10.0, -20.0, 30.0), size_mm=(15.0, 15.0, 15.0)),
        centroid_mm=(10.5, -20.5, 30.5),
        frame_of_reference_uid="1.2.3.4.5",
        localization=Localization(
            site=site,
            final_label="liver",
            coarse_ranking=(RankedLabel("abdomen", 0.9),),
            fine_ranking=(RankedLabel("liver", 0.8),),
            alternatives=(RankedLabel("liver", 0.8), RankedLabel("stomach", 0.1)),
            model=model,
            geometry_mode="corrected",
        ),
        flags=(Flag("suv_peak_partial", "sphere clipped at the volume edge"),),
    )


def analysis_result(n_lesions: int = 2) -> AnalysisResult:
    return AnalysisResult(
        study_instance_uid=STUDY,
        lesions=[lesion_finding(f"S{i}", i) for i in range(1, n_lesions + 1)],
        suv=SuvInfo(
            kind=SuvKind.SUV_BW,
            unit="g/ml{SUVbw}",
            scale_factor=0.0002,
            decay_reference="series_time",
            injection_datetime=None,
            reference_datetime=None,
        ),
        timings_s={"total": 1.5},
        sr_sop_instance_uid="1.2.826.0.1.3680043.10.1.7.1",
    )


def store(database: Database, vid: int, sr_uid: str, predecessor: str | None = None, n: int = 2) -> repo.StoredAnalysis:
    result = analysis_result(n).to_json()
    with database.session() as s:
        assert repo.claim_analysis(s, vid, T0 + timedelta(minutes=3))
        return repo.store_analysis_result(
            s,
            vid,
            result,
            result["lesions"],
            {"sr_sop_uid": sr_uid, "series_uid": sr_uid + ".0", "path": f"{sr_uid}.dcm", "predecessor": predecessor},
            T0 + timedelta(minutes=4),
        )


# ----------------------------------------------------------------- migrations


def test_upgrade_on_empty_database_reaches_head_and_matches_models(db_url: str) -> None:
    database = Database(db_url)
    try:
        assert database.current_revision() is None
        database.upgrade()
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert head is not None and database.current_revision() == head
        database.upgrade()  # idempotent
        assert database.current_revision() == head
        with database.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
    finally:
        database.dispose()


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'sub' / 'locus.db'}", sqlite_busy_timeout_ms=1234)
    try:
        with database.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
        assert (tmp_path / "sub" / "locus.db").exists()
    finally:
        database.dispose()


def test_readonly_session_does_not_block_writers(database: Database) -> None:
    """CLI queries run while the listener writes (SQLite: deferred BEGIN under WAL)."""
    with database.session() as s:
        repo.record_instance(s, rec("1.2.3.1"), T0)
    with database.session(readonly=True) as reader:
        assert len(repo.list_studies(reader)) == 1
        done = threading.Event()

        def write() -> None:
            with database.session() as s:
                repo.record_instance(s, rec("1.2.3.2"), T0)
            done.set()

        thread = threading.Thread(target=write)
        thread.start()
        assert done.wait(timeout=15), "a writer waited for a read-only session"
        thread.join()
    with database.session(readonly=True) as reader:
        assert reader.scalar(select(func.count(Instance.id))) == 2


def test_foreign_keys_are_enforced(database: Database) -> None:
    with pytest.raises(IntegrityError), database.session() as s:
        s.add(
            Series(
                study_id=999_999,
                series_uid="1.2.3",
                modality="CT",
                sop_class_uid=CT_IMAGE,
                instance_count=0,
                first_received_at=T0,
                last_received_at=T0,
            )
        )


# ----------------------------------------------------------------- receiving


def test_record_instance_is_idempotent_and_counts(database: Database) -> None:
    with database.session() as s:
        first = repo.record_instance(s, rec("1.2.3.1", instance_number=1), T0)
        second = repo.record_instance(s, rec("1.2.3.2", instance_number=2), T0 + timedelta(seconds=1))
    assert (first.new, first.receive_count) == (True, 1)
    assert second.new and not second.late

    # A resend written to another spool path: counted once, the first copy is kept.
    with database.session() as s:
        again = repo.record_instance(s, rec("1.2.3.1", path="elsewhere/copy.dcm"), T0 + timedelta(seconds=5))
    assert again == repo.RecordOutcome(new=False, receive_count=2, path=f"{STUDY}/{CT_SERIES}/1.2.3.1.dcm")

    with database.session() as s:
        study = s.scalars(select(Study)).one()
        series = s.scalars(select(Series)).one()
        assert (study.instance_count, series.instance_count) == (2, 2)
        assert study.first_received_at == T0
        assert study.last_received_at == T0 + timedelta(seconds=5)  # a resend is activity
        assert study.pending_since == T0
        assert study.status == "receiving"
        assert s.scalar(select(func.count(Instance.id))) == 2
        counts = dict(s.execute(select(Instance.sop_uid, Instance.receive_count)).all())
        assert counts == {"1.2.3.1": 2, "1.2.3.2": 1}
        events = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    assert [e.kind for e in events] == ["received"] * 3
    assert [e.detail["new"] for e in events] == [True, True, False]  # type: ignore[index]
    assert events[2].sop_uid == "1.2.3.1" and events[2].calling_ae == "MODALITY1"
    assert events[0].at == T0 and events[0].at.tzinfo is not None


def test_out_of_order_times_never_move_last_received_back(database: Database) -> None:
    with database.session() as s:
        repo.record_instance(s, rec("1.2.3.1"), T0 + timedelta(seconds=10))
        repo.record_instance(s, rec("1.2.3.2"), T0)
    with database.session() as s:
        assert s.scalars(select(Study.last_received_at)).one() == T0 + timedelta(seconds=10)
        assert s.scalars(select(Series.last_received_at)).one() == T0 + timedelta(seconds=10)


def test_uid_conflicts_are_input_errors(database: Database) -> None:
    with database.session() as s:
        repo.record_instance(s, rec("1.2.3.1"), T0)
    with pytest.raises(InputError) as err, database.session() as s:
        repo.record_instance(s, rec("1.2.3.9", study="9.9.9"), T0)  # same series, other study
    assert err.value.code == "uid_conflict"
    with pytest.raises(InputError) as err, database.session() as s:
        repo.record_instance(s, rec("1.2.3.1", series="1.2.3.99"), T0)  # same SOP, other series
    assert err.value.code == "uid_conflict"
    with database.session() as s:
        assert s.scalar(select(func.count(Study.id))) == 1  # the conflicting study was rolled back
        assert s.scalar(select(func.count(Instance.id))) == 1


def test_invalid_records_are_refused(database: Database) -> None:
    with database.session() as s:
        with pytest.raises(InputError):
            repo.record_instance(s, rec("1." + "2" * 70), T0)
        with pytest.raises(ValueError):
            repo.record_instance(s, rec("1.2.3.1", path="/abs/path.dcm"), T0)
        with pytest.raises(ValueError):
            repo.record_instance(s, rec("1.2.3.1", path="a/../../etc/passwd"), T0)
        with pytest.raises(ValueError):
            repo.record_instance(s, rec("1.2.3.1"), datetime(2026, 1, 1))  # naive


def test_rejection_is_audited(database: Database) -> None:
    with database.session() as s:
        repo.record_rejection(
            s,
            code="unknown_calling_ae",
            reason="calling AE EVIL is not in dicom.allowed_callers",
            calling_ae="EVIL",
            peer_host="10.0.0.9",
            sop_uid=None,
            now=T0,
        )
    with database.session() as s:
        event = s.scalars(select(AuditEvent)).one()
    assert event.kind == "rejected" and event.calling_ae == "EVIL"
    assert event.detail == {
        "code": "unknown_calling_ae",
        "reason": "calling AE EVIL is not in dicom.allowed_callers",
        "peer_host": "10.0.0.9",
    }


def test_audit_event_rolls_back_with_its_state_change(database: Database) -> None:
    with pytest.raises(IntegrityError), database.session() as s:
        repo.record_instance(s, rec("1.2.3.1"), T0)
        # A second study row with the same UID: the flush fails inside the same unit of work.
        s.add(Study(study_uid=STUDY, status="receiving", first_received_at=T0, last_received_at=T0))
        s.flush()
    with database.session() as s:
        assert s.scalar(select(func.count(Instance.id))) == 0
        assert s.scalar(select(func.count(Study.id))) == 0
        assert s.scalar(select(func.count(AuditEvent.id))) == 0


# ----------------------------------------------------------------- analysis


def test_claim_is_idempotent_and_store_completes(database: Database) -> None:
    vid = received_version(database)
    with database.session() as s:
        assert repo.get_version(s, vid).state == "pending"
        assert repo.versions_to_enqueue(s) == [vid]
        assert repo.mark_queued(s, [vid], T0 + timedelta(minutes=2)) == 1
        assert repo.mark_queued(s, [vid], T0 + timedelta(minutes=2)) == 0
        assert repo.versions_to_enqueue(s) == []
    with database.session() as s:
        assert repo.claim_analysis(s, vid, T0 + timedelta(minutes=3))
    with database.session() as s:  # a redelivered/duplicate task while the lease is held does nothing
        assert not repo.claim_analysis(s, vid, T0 + timedelta(minutes=4))
    with database.session() as s:
        analysis = s.scalars(select(Analysis)).one()
        assert (analysis.status, analysis.attempts) == ("running", 1)
        assert s.scalars(select(Study.status)).one() == "analysing"

    result = analysis_result(2).to_json()
    with database.session() as s:
        stored = repo.store_analysis_result(
            s,
            vid,
            result,
            result["lesions"],
            {"sr_sop_uid": "1.2.9.1", "series_uid": "1.2.9", "path": "sr/1.2.9.1.dcm", "predecessor": None},
            T0 + timedelta(minutes=5),
        )
    assert stored.lesion_count == 2 and stored.report_id is not None
    with database.session() as s:
        assert not repo.claim_analysis(s, vid, T0 + timedelta(minutes=6))  # already done
        analysis = s.scalars(select(Analysis)).one()
        assert analysis.status == "succeeded" and analysis.timings == {"total": 1.5}
        assert analysis.result is not None and analysis.result["sr_sop_instance_uid"] == "1.2.826.0.1.3680043.10.1.7.1"
        assert repo.get_version(s, vid).state == "analysed"
        assert s.scalars(select(Study.status)).one() == "analysed"

    # Storing again (a retried task) replaces lesions instead of duplicating them.
    with database.session() as s:
        again = repo.store_analysis_result(
            s,
            vid,
            result,
            result["lesions"][:1],
            {"sr_sop_uid": "1.2.9.1", "series_uid": "1.2.9", "path": "sr/1.2.9.1.dcm", "predecessor": None},
            T0 + timedelta(minutes=7),
        )
    assert again.report_id == stored.report_id
    with database.session() as s:
        assert s.scalar(select(func.count(Lesion.id))) == 1
    assert audit_kinds(database)[-5:] == ["complete", "queued", "started", "analysed", "analysed"]


def test_lesion_rows_follow_the_findings_contract(database: Database) -> None:
    vid = received_version(database)
    store(database, vid, "1.2.9.1")
    with database.session() as s:
        rows = repo.list_lesions(s, STUDY)
    assert [r.lesion_id for r in rows] == ["S1", "S2"]
    r = rows[0]
    assert (r.suv_max, r.suv_mean, r.suv_peak, r.suv_unit) == (12.5, 7.25, 9.0, "g/ml{SUVbw}")
    assert (r.volume_ml, r.tlg, r.ct_mean_hu, r.voxel_count) == (3.375, 24.47, 41.0, 27)
    assert (r.site_id, r.site_code, r.site_name, r.model_id) == ("liver", "10200004", "Liver", "hclal-test")
    assert r.centroid_mm == [10.5, -20.5, 30.5]
    with database.session() as s:
        row = s.scalars(select(Lesion).where(Lesion.lesion_id == "S1")).one()
        assert row.bbox == {"center_mm": [10.0, -20.0, 30.0], "size_mm": [15.0, 15.0, 15.0]}
        assert row.localization is not None and row.localization["alternatives"][1]["label"] == "stomach"
        assert row.flags == [{"code": "suv_peak_partial", "message": "sphere clipped at the volume edge"}]
    with pytest.raises(ValueError, match="Lesion JSON"), database.session() as s:
        vid2 = s.scalar(select(StudyVersion.id))
        repo.store_analysis_result(s, vid2, {}, [{"lesion_id": "X"}], None, T0)  # type: ignore[arg-type]


def test_fail_analysis_records_reason(database: Database) -> None:
    vid = received_version(database)
    with database.session() as s:
        assert repo.claim_analysis(s, vid, T0 + timedelta(minutes=3))
        repo.fail_analysis(s, vid, "geometry_error", "PET slices are not equally spaced", T0 + timedelta(minutes=4))
    with database.session() as s:
        analysis = s.scalars(select(Analysis)).one()
        assert (analysis.status, analysis.reason_code) == ("failed", "geometry_error")
        assert analysis.reason_text == "PET slices are not equally spaced"
        assert not repo.claim_analysis(s, vid, T0 + timedelta(minutes=5))
        assert s.scalars(select(Study.status)).one() == "failed"
        with pytest.raises(ValueError, match="claim it first"):
            repo.store_analysis_result(s, vid, {}, [], None, T0 + timedelta(minutes=6))
    with database.session() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.kind == "failed")).one()
        assert event.detail == {"version": 1, "code": "geometry_error", "reason": "PET slices are not equally spaced",
                                "attempts": 1}


def test_failed_version_can_be_rerun_and_a_late_failure_does_not_undo_a_result(database: Database) -> None:
    vid = received_version(database)
    with database.session() as s:
        assert repo.claim_analysis(s, vid, T0 + timedelta(minutes=3))
        assert repo.fail_analysis(s, vid, "model_error", "checkpoint missing", T0 + timedelta(minutes=4))
    with database.session() as s:
        assert repo.requeue_failed(s, vid, T0 + timedelta(minutes=5))
        assert not repo.requeue_failed(s, vid, T0 + timedelta(minutes=5))  # no longer failed
        assert repo.versions_to_enqueue(s) == [vid]
        assert repo.claim_analysis(s, vid, T0 + timedelta(minutes=6))
    with database.session() as s:
        analysis = s.scalars(select(Analysis)).one()  # still one analysis per version
        # The operator's requeue granted a new round of attempts (the audit keeps the old count).
        assert (analysis.status, analysis.attempts, analysis.reason_code) == ("running", 1, None)
    result = analysis_result(1).to_json()
    with database.session() as s:
        repo.store_analysis_result(s, vid, result, result["lesions"], None, T0 + timedelta(minutes=7))
        # A duplicate task that fails afterwards must not mark the stored result failed.
        assert not repo.fail_analysis(s, vid, "internal_error", "late duplicate", T0 + timedelta(minutes=8))
        assert repo.get_version(s, vid).state == "analysed"
        assert not repo.requeue_failed(s, vid, T0 + timedelta(minutes=9))
    assert "requeued" in audit_kinds(database)


@pytest.mark.slow
def test_concurrent_upgrades_are_serialised(db_url: str) -> None:
    """Several services starting at once may all migrate an empty database."""
    code = "import sys; from node.db import Database; Database(sys.argv[1]).upgrade()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, db_url], stderr=subprocess.PIPE, text=True) for _ in range(3)
    ]
    failures = [p.stderr.read() for p in procs if p.wait(timeout=120) != 0]  # type: ignore[union-attr]
    assert failures == []
    database = Database(db_url)
    try:
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert database.current_revision() == head
        with database.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    finally:
        database.dispose()


def test_instances_for_version_and_previous_report(database: Database) -> None:
    vid1 = received_version(database, n_ct=2)
    store(database, vid1, "1.2.9.1")
    with database.session() as s:
        late = repo.record_instance(s, rec(f"{CT_SERIES}.3", instance_number=3), T0 + timedelta(minutes=10))
    assert late.new and late.late
    with database.session() as s:
        assert s.scalars(select(Study.has_late_instances)).one()
        snap = repo.lock_study(s, s.scalars(select(Study.id)).one())
        assert snap is not None
        vid2 = repo.create_study_version(s, snap, rule="quiet_timer", reason="test", now=T0 + timedelta(minutes=12))
    assert vid2 is not None
    with database.session() as s:
        v1 = repo.instances_for_version(s, vid1)
        v2 = repo.instances_for_version(s, vid2)
        assert [i.sop_uid for i in v1] == [f"{CT_SERIES}.1", f"{CT_SERIES}.2"]
        assert [i.sop_uid for i in v2] == [f"{CT_SERIES}.1", f"{CT_SERIES}.2", f"{CT_SERIES}.3"]
        path, _sop, series, modality = v2[2]
        assert (path, series, modality) == (f"{STUDY}/{CT_SERIES}/{CT_SERIES}.3.dcm", CT_SERIES, "CT")
        info1, info2 = repo.get_version(s, vid1), repo.get_version(s, vid2)
        assert (info1.version, info2.version, info2.instance_count) == (1, 2, 3)
        assert info1.instance_set_hash != info2.instance_set_hash
        assert repo.previous_report(s, STUDY, before_version=2) is not None
        assert repo.previous_report(s, STUDY, before_version=1) is None
    store(database, vid2, "1.2.9.2", predecessor="1.2.9.1")
    with database.session() as s:
        prev = repo.previous_report(s, STUDY, before_version=3)
        assert prev is not None and (prev.sr_sop_uid, prev.version, prev.predecessor_sop_uid) == (
            "1.2.9.2",
            2,
            "1.2.9.1",
        )
        assert repo.previous_report(s, STUDY, before_version=2).sr_sop_uid == "1.2.9.1"  # type: ignore[union-attr]


# ----------------------------------------------------------------- exports


def test_export_state_machine_with_retry(database: Database) -> None:
    stored = store(database, received_version(database), "1.2.9.1")
    assert stored.report_id is not None
    t = T0 + timedelta(minutes=10)
    with database.session() as s:
        eid = repo.create_export(s, stored.report_id, "pacs", now=t)
        assert repo.create_export(s, stored.report_id, "pacs", now=t) == eid  # idempotent
    with database.session() as s:
        (row,) = repo.due_exports(s, t)
        assert (row.export_id, row.destination, row.sr_sop_uid, row.study_uid) == (eid, "pacs", "1.2.9.1", STUDY)
        assert (row.sr_path, row.study_version, row.attempts) == ("1.2.9.1.dcm", 1, 0)
        assert repo.due_exports(s, t) == []  # claimed: a second exporter gets nothing
        repo.record_export_attempt(
            s, eid, ok=False, status=None, error="connection refused", next_attempt_at=t + timedelta(seconds=30), now=t
        )
    with database.session() as s:
        assert repo.due_exports(s, t + timedelta(seconds=29)) == []
        (row,) = repo.due_exports(s, t + timedelta(seconds=30))
        assert row.attempts == 1
        # Attempts exhausted: no next attempt → failed (a visible dead letter, never a loop).
        repo.record_export_attempt(
            s,
            eid,
            ok=False,
            status=0xA700,
            error="out of resources",
            next_attempt_at=None,
            now=t + timedelta(seconds=31),
        )
    with database.session() as s:
        export = s.get(Export, eid)
        assert export is not None and (export.state, export.attempts, export.last_status) == ("failed", 2, 0xA700)
        assert repo.due_exports(s, t + timedelta(days=1)) == []
        assert repo.retry_failed_exports(s, t + timedelta(hours=1)) == 1
        assert repo.retry_failed_exports(s, t + timedelta(hours=1)) == 0
    with database.session() as s:
        (row,) = repo.due_exports(s, t + timedelta(hours=1))
        assert row.attempts == 0  # a new round
        repo.record_export_attempt(
            s, eid, ok=True, status=0, error=None, next_attempt_at=None, now=t + timedelta(hours=1)
        )
    with database.session() as s:
        export = s.get(Export, eid)
        assert export is not None and export.state == "done" and export.done_at == t + timedelta(hours=1)
        assert s.scalar(select(func.count(ExportAttempt.id))) == 3
        assert s.scalars(select(StudyVersion.state)).one() == "exported"
        assert s.scalars(select(Study.status)).one() == "exported"
        assert repo.due_exports(s, t + timedelta(days=2)) == []
    assert [k for k in audit_kinds(database) if k.startswith("export")] == [
        "export_queued",
        "export_failed",
        "export_failed",
        "export_retry",
        "exported",
    ]


def test_export_lease_expires_when_the_exporter_dies(database: Database) -> None:
    stored = store(database, received_version(database), "1.2.9.1")
    assert stored.report_id is not None
    t = T0 + timedelta(minutes=10)
    with database.session() as s:
        eid = repo.create_export(s, stored.report_id, "pacs", now=t)
        assert [r.export_id for r in repo.due_exports(s, t, lease_s=60)] == [eid]
    with database.session() as s:
        assert repo.due_exports(s, t + timedelta(seconds=59)) == []
        assert [r.export_id for r in repo.due_exports(s, t + timedelta(seconds=60))] == [eid]


def test_version_is_exported_only_when_every_destination_is_done(database: Database) -> None:
    stored = store(database, received_version(database), "1.2.9.1")
    assert stored.report_id is not None
    t = T0 + timedelta(minutes=10)
    with database.session() as s:
        a = repo.create_export(s, stored.report_id, "pacs", now=t)
        b = repo.create_export(s, stored.report_id, "archive", now=t)
        assert {r.export_id for r in repo.due_exports(s, t)} == {a, b}
        repo.record_export_attempt(s, a, ok=True, status=0, error=None, next_attempt_at=None, now=t)
    with database.session() as s:
        assert s.scalars(select(StudyVersion.state)).one() == "analysed"
        repo.record_export_attempt(s, b, ok=True, status=0, error=None, next_attempt_at=None, now=t)
    with database.session() as s:
        assert s.scalars(select(StudyVersion.state)).one() == "exported"


# ----------------------------------------------------------------- embeddings


def test_embedding_roundtrip_is_float32(database: Database) -> None:
    vid = received_version(database)
    vector = [0.1, -2.5, 3.0e-8, 1.0]
    with database.session() as s:
        repo.store_embedding(s, vid, model_id="hlip-test", vector=vector, preprocessing_version="p1", now=T0)
        repo.store_embedding(s, vid, model_id="hlip-test", vector=vector[::-1], preprocessing_version="p2", now=T0)
    with database.session() as s:
        loaded = repo.load_embedding(s, vid, "hlip-test")
        assert repo.load_embedding(s, vid, "other") is None
    assert loaded == pytest.approx(vector[::-1], rel=1e-7)
    with database.session() as s:
        row = s.scalars(select(StudyEmbedding)).one()  # replaced, not duplicated
        assert (row.dim, row.preprocessing_version, len(row.vector)) == (4, "p2", 16)
        assert row.vector[:4] == struct.pack("<f", 1.0)  # little-endian float32


# ----------------------------------------------------------------- CLI


def _settings_for(database: Database, tmp_path: Path) -> LocusSettings:
    url = database.url.render_as_string(hide_password=False)
    return LocusSettings(storage={"data_dir": str(tmp_path)}, database={"url": url})


def test_results_cli_json_and_tables(database: Database, tmp_path: Path) -> None:
    vid = received_version(database)
    store(database, vid, "1.2.9.1")
    settings = _settings_for(database, tmp_path)
    runner = CliRunner()

    out = runner.invoke(results_group, ["studies", "--json"], obj=settings)
    assert out.exit_code == 0, out.output
    (study,) = json.loads(out.output)
    assert (study["study_uid"], study["status"], study["lesions"], study["instances"]) == (STUDY, "analysed", 2, 3)

    out = runner.invoke(results_group, ["lesions", STUDY, "--json"], obj=settings)
    assert out.exit_code == 0, out.output
    lesions = json.loads(out.output)
    assert [(r["lesion_id"], r["suv_max"], r["site_name"]) for r in lesions] == [
        ("S1", 12.5, "Liver"),
        ("S2", 12.5, "Liver"),
    ]

    out = runner.invoke(results_group, ["show", STUDY, "--json"], obj=settings)
    assert out.exit_code == 0, out.output
    detail = json.loads(out.output)
    assert [v["version"] for v in detail["versions"]] == [1]
    assert detail["versions"][0]["analysis"]["status"] == "succeeded"
    assert detail["reports"][0]["sr_sop_uid"] == "1.2.9.1"
    assert [s["series_uid"] for s in detail["series"]] == [CT_SERIES]

    out = runner.invoke(results_group, ["lesions"], obj=settings, terminal_width=200)
    assert out.exit_code == 0 and "12.50" in out.output and "Liver" in out.output and "2 lesions" in out.output
    out = runner.invoke(results_group, ["studies"], obj=settings, terminal_width=200)
    assert out.exit_code == 0 and STUDY in out.output and "analysed" in out.output
    out = runner.invoke(results_group, ["show", STUDY], obj=settings, terminal_width=200)
    assert out.exit_code == 0 and "quiet_timer" in out.output and "1.2.9.1" in out.output

    out = runner.invoke(results_group, ["show", "9.9.9"], obj=settings)
    assert out.exit_code == 1 and "no such study: no study with Study Instance UID 9.9.9" in out.output


def test_db_cli_upgrade(db_url: str, tmp_path: Path) -> None:
    settings = LocusSettings(storage={"data_dir": str(tmp_path)}, database={"url": db_url})
    runner = CliRunner()
    out = runner.invoke(db_group, ["current"], obj=settings)
    assert out.exit_code == 0 and out.output.strip() == "empty"
    out = runner.invoke(db_group, ["upgrade"], obj=settings)
    assert out.exit_code == 0, out.output
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert f"migrated from empty to {head}" in out.output
    out = runner.invoke(db_group, ["upgrade"], obj=settings)
    assert out.exit_code == 0 and f"already at revision {head}" in out.output
    database = Database(db_url)
    try:
        with database.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM studies")).scalar() == 0
    finally:
        database.dispose()


def test_unsupported_database_backend_is_refused_when_opened() -> None:
    from node.db.base import Database

    with pytest.raises(ValueError, match="not supported: use SQLite or PostgreSQL"):
        Database("mysql+pymysql://root@127.0.0.1/test")
