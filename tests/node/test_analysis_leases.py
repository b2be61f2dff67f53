"""Analysis leases (issue 12, defect 1): the database, not the broker, guarantees that a
claimed analysis ends in a recorded state.

Database tests run on SQLite and PostgreSQL (``database`` fixture): claim, renew, expiry,
reclaim, the attempt bound and fencing of a worker whose lease was taken over.  Job tests
run the real analysis of the bundled demo study (``node/demo_study``) on SQLite: an
unexpected error (an unwritable reports directory) ends ``failed`` with an audit row, and
the lease settings take effect.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from sqlalchemy import select, update

from node import jobs
from node.cli import main
from node.db import Database, repo
from node.db.models import Analysis, AuditEvent, Report, Study, StudyVersion
from node.settings import LocusSettings
from node.tasks.context import build_context
from tests.helpers import pause_after_claim
from tests.helpers.pause_after_claim import PAUSE_AFTER_CLAIM_ENV
from tests.helpers.polling import wait_until
from tests.node.review_export_helpers import ingest_and_analyse
from tests.node.test_db import T0, analysis_result, audit_kinds, rec, received_version

CLAIM = T0 + timedelta(minutes=3)
LEASE_S = 60.0
SR = {"sr_sop_uid": "1.2.9.1", "series_uid": "1.2.9", "path": "sr/1.2.9.1.dcm", "predecessor": None}


def _study_version(database: Database, n: int, now=T0) -> int:  # type: ignore[no-untyped-def]
    """Study number ``n`` (its own UIDs) with one CT instance, declared complete as version 1."""
    study, series = f"1.2.826.0.1.3680043.10.9.{n}", f"1.2.826.0.1.3680043.10.9.{n}.1"
    with database.session() as s:
        repo.record_instance(s, rec(f"{series}.1", series=series, study=study), now)
    with database.session() as s:
        study_id = s.scalar(select(Study.id).where(Study.study_uid == study))
        snap = repo.lock_study(s, study_id)
        assert snap is not None
        vid = repo.create_study_version(s, snap, rule="quiet_timer", reason="test", now=now + timedelta(minutes=2))
        assert vid is not None
        return vid


def _analysis(database: Database) -> SimpleNamespace:
    """A snapshot of the one analysis row's columns."""
    with database.session(readonly=True) as s:
        a = s.scalars(select(Analysis)).one()
        return SimpleNamespace(**{c.key: getattr(a, c.key) for c in Analysis.__table__.columns})


def _state(database: Database, vid: int) -> str:
    with database.session(readonly=True) as s:
        return repo.get_version(s, vid).state


def _claim(database: Database, vid: int, at=CLAIM, lease_s: float = LEASE_S) -> str | None:  # type: ignore[no-untyped-def]
    with database.session() as s:
        return repo.claim_analysis(s, vid, at, lease_s=lease_s)


def _reclaim(database: Database, at, max_attempts: int = 3) -> list[repo.Reclaimed]:  # type: ignore[no-untyped-def]
    with database.session() as s:
        return repo.reclaim_expired_leases(s, at, max_attempts=max_attempts)


def _audit(database: Database, kind: str) -> list[dict]:  # type: ignore[type-arg]
    with database.session(readonly=True) as s:
        return [e.detail for e in s.scalars(select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id))]


# ------------------------------------------------------------------ database (SQLite + PostgreSQL)


def test_claim_holds_a_lease_that_only_its_holder_renews(database: Database) -> None:
    vid = received_version(database)
    token = _claim(database, vid)
    assert token
    a = _analysis(database)
    assert (a.status, a.attempts, a.lease_owner) == ("running", 1, token)
    assert a.lease_expires_at == CLAIM + timedelta(seconds=LEASE_S)
    # A duplicate or redelivered message while the lease is held does nothing.
    assert _claim(database, vid, CLAIM + timedelta(seconds=30)) is None
    with database.session() as s:
        assert repo.renew_lease(s, vid, token, CLAIM + timedelta(seconds=50), LEASE_S)
        assert not repo.renew_lease(s, vid, "someone-else", CLAIM + timedelta(seconds=50), LEASE_S)
        assert repo.holds_lease(s, vid, token) and not repo.holds_lease(s, vid, "someone-else")
    assert _analysis(database).lease_expires_at == CLAIM + timedelta(seconds=50 + LEASE_S)
    # Renewed: not reclaimed at the first expiry time.
    assert _reclaim(database, CLAIM + timedelta(seconds=LEASE_S + 1)) == []
    assert _state(database, vid) == "analysing"


def test_expired_lease_is_reclaimed_audited_requeued_and_the_old_holder_is_fenced(database: Database) -> None:
    vid = received_version(database)
    old = _claim(database, vid)
    assert old
    assert _reclaim(database, CLAIM + timedelta(seconds=LEASE_S - 1)) == []  # still valid
    expired_at = CLAIM + timedelta(seconds=LEASE_S + 1)
    (r,) = _reclaim(database, expired_at)
    assert (r.study_version_id, r.version, r.attempts, r.requeued) == (vid, 1, 1, True)
    assert _reclaim(database, expired_at) == []  # reclaimed once
    with database.session(readonly=True) as s:
        version = s.get(StudyVersion, vid)
        assert version is not None and (version.state, version.queued_at) == ("queued", expired_at)
        assert s.scalars(select(AuditEvent.kind).order_by(AuditEvent.id.desc()).limit(2)).all() == [
            "requeued", "lease_expired"]  # fmt: skip
    (lease_event,) = _audit(database, "lease_expired")
    assert (lease_event["version"], lease_event["attempt"], lease_event["holder"]) == (1, 1, old)
    a = _analysis(database)
    assert (a.lease_owner, a.lease_expires_at, a.attempts) == (None, None, 1)

    # The old holder (stalled, not dead) may neither renew, nor store, nor fail the version.
    result = analysis_result(2).to_json()
    with database.session() as s:
        assert not repo.renew_lease(s, vid, old, expired_at, LEASE_S)
        assert not repo.fail_analysis(s, vid, "internal_error", "late", expired_at, lease_owner=old)
    with pytest.raises(repo.LeaseLost), database.session() as s:
        repo.store_analysis_result(s, vid, result, result["lesions"], SR, expired_at, lease_owner=old)
    assert _state(database, vid) == "queued"

    # The next message claims it again (attempt 2); the new holder stores, once.
    new = _claim(database, vid, expired_at + timedelta(seconds=1))
    assert new and new != old
    assert _analysis(database).attempts == 2
    with pytest.raises(repo.LeaseLost), database.session() as s:  # fenced even while the version is analysing
        repo.store_analysis_result(s, vid, result, result["lesions"], SR, expired_at, lease_owner=old)
    with database.session() as s:
        stored = repo.store_analysis_result(s, vid, result, result["lesions"], SR, expired_at + timedelta(seconds=9),
                                            lease_owner=new)  # fmt: skip
        assert stored.report_id is not None
    with database.session(readonly=True) as s:
        assert len(s.scalars(select(Report)).all()) == 1
    a = _analysis(database)
    assert (a.status, a.attempts, a.lease_owner) == ("succeeded", 2, None)
    assert _state(database, vid) == "analysed"
    assert _reclaim(database, expired_at + timedelta(hours=5)) == []  # nothing left to reclaim
    assert [d["attempt"] for d in _audit(database, "started")] == [1, 2]


def test_attempts_are_bounded_then_the_version_fails_with_the_reason(database: Database) -> None:
    vid = received_version(database)
    at = CLAIM
    for attempt in (1, 2):
        assert _claim(database, vid, at)
        at += timedelta(seconds=LEASE_S + 1)
        (r,) = _reclaim(database, at, max_attempts=2)
        assert (r.attempts, r.requeued) == (attempt, attempt < 2)
    assert _state(database, vid) == "failed"
    a = _analysis(database)
    assert (a.status, a.reason_code, a.attempts) == ("failed", "attempts_exhausted", 2)
    assert a.reason_text is not None and "2 attempt(s)" in a.reason_text and "lease" in a.reason_text
    (failed,) = _audit(database, "failed")
    assert failed["code"] == "attempts_exhausted" and failed["attempts"] == 2
    assert _claim(database, vid, at) is None  # failed stays failed until an operator requeues it
    with database.session(readonly=True) as s:
        assert repo.stale_queued_versions(s, at + timedelta(days=1)) == []

    # The operator grants a new round: pending, attempts restart, audited.
    with database.session() as s:
        assert repo.requeue_failed(s, vid, at)
    assert _state(database, vid) == "pending" and _analysis(database).attempts == 0
    assert _audit(database, "requeued")[-1] == {"version": 1, "reason": "operator", "previous_attempts": 2}


def test_a_reclaimed_version_whose_message_is_lost_is_found_by_the_stale_requeue(database: Database) -> None:
    vid = received_version(database)
    assert _claim(database, vid)
    at = CLAIM + timedelta(seconds=LEASE_S + 1)
    assert _reclaim(database, at)[0].requeued
    with database.session() as s:
        assert repo.stale_queued_versions(s, at) == []
        later = at + timedelta(hours=2)
        assert repo.stale_queued_versions(s, later - timedelta(hours=1)) == [vid]
        assert repo.mark_requeued_stale(s, [vid], later - timedelta(hours=1), later) == 1
    assert _audit(database, "requeued")[-1]["reason"] == "stale_queued"


def test_transient_error_hands_the_lease_back_within_the_attempt_bound(database: Database) -> None:
    vid = received_version(database)
    token = _claim(database, vid)
    assert token
    with database.session() as s:
        assert repo.release_analysis(s, vid, "not-the-holder", "transient", "db locked", CLAIM, max_attempts=2) is None
        assert repo.release_analysis(s, vid, token, "transient", "db locked", CLAIM, max_attempts=2) is True
    assert _state(database, vid) == "queued"
    token = _claim(database, vid, CLAIM + timedelta(seconds=5))
    assert token
    with database.session() as s:
        assert repo.release_analysis(s, vid, token, "transient", "db locked", CLAIM, max_attempts=2) is False
    a = _analysis(database)
    assert (_state(database, vid), a.reason_code) == ("failed", "attempts_exhausted")
    assert a.reason_text is not None and "transient: db locked" in a.reason_text


def test_running_analysis_without_a_lease_counts_as_expired(database: Database) -> None:
    """Rows written before migration 0004 have no lease: the sweeper must not leave them."""
    vid = received_version(database)
    assert _claim(database, vid)
    with database.session() as s:
        s.execute(update(Analysis).values(lease_owner=None, lease_expires_at=None))
    (r,) = _reclaim(database, CLAIM + timedelta(seconds=1))
    assert r.requeued and _state(database, vid) == "queued"
    assert _audit(database, "lease_expired")[0]["holder"] is None


def test_stranded_versions_are_listed_and_requeued_by_the_operator(database: Database) -> None:
    live = _study_version(database, 1)
    assert _claim(database, live, lease_s=3600)
    expired = _study_version(database, 2)
    with database.session() as s:
        s.execute(update(StudyVersion).where(StudyVersion.id == expired).values(state="queued"))
    assert _claim(database, expired, CLAIM)
    norow = _study_version(database, 3)
    with database.session() as s:  # analysing without an analysis row (an inconsistent crash)
        s.execute(update(StudyVersion).where(StudyVersion.id == norow).values(state="analysing"))
    now = CLAIM + timedelta(seconds=LEASE_S + 1)
    with database.session(readonly=True) as s:
        assert repo.stranded_versions(s, now) == sorted([expired, norow])
        rows = {r.study_version_id: r for r in repo.list_analyses(s, now, state="stranded")}
        assert sorted(rows) == sorted([expired, norow]) and rows[expired].attempts == 1
        assert [r.study_version_id for r in repo.list_analyses(s, now, state="analysing")] == sorted(
            [live, expired, norow], reverse=True)  # fmt: skip
    with database.session() as s:
        assert not repo.requeue_stranded(s, live, now)  # a live lease is not stranded
        assert repo.requeue_stranded(s, expired, now)
        assert repo.requeue_stranded(s, norow, now)
        assert not repo.requeue_stranded(s, norow, now)  # once
    assert [_state(database, v) for v in (live, expired, norow)] == ["analysing", "pending", "pending"]
    assert [d["reason"] for d in _audit(database, "requeued")] == ["stranded", "stranded"]
    with database.session(readonly=True) as s:
        assert repo.versions_to_enqueue(s) == sorted([expired, norow])


def test_cli_lists_and_requeues_analyses(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = LocusSettings(database={"url": database.url.render_as_string(hide_password=False)}
                             if hasattr(database.url, "render_as_string") else {"url": str(database.url)})
    monkeypatch.setattr(LocusSettings, "load", classmethod(lambda cls, *a, **k: settings))
    failed = received_version(database)
    with database.session() as s:
        assert repo.claim_analysis(s, failed, CLAIM)
        assert repo.fail_analysis(s, failed, "geometry_error", "PET slices are not equally spaced", CLAIM)
    stranded = _study_version(database, 2)
    with database.session() as s:
        s.execute(update(StudyVersion).where(StudyVersion.id == stranded).values(state="analysing"))
    runner = CliRunner()
    out = runner.invoke(main, ["analyses", "list", "--state", "failed"])
    assert out.exit_code == 0, out.output
    assert str(failed) in out.output and "geometry_error: PET slices are not equally spaced" in out.output
    out = runner.invoke(main, ["analyses", "list", "--json"])
    rows = {r["id"]: r for r in json.loads(out.stdout)}
    assert rows[failed]["state"] == "failed" and rows[failed]["attempts"] == 1
    assert rows[stranded]["stranded"] is True
    assert runner.invoke(main, ["analyses", "requeue", "--failed", "--stranded"]).exit_code != 0
    out = runner.invoke(main, ["analyses", "requeue", "--stranded"])
    assert out.exit_code == 0 and f"1 study version(s) requeued: {stranded}" in out.output
    out = runner.invoke(main, ["analyses", "requeue", str(failed)])
    assert out.exit_code == 0 and "1 study version(s) requeued" in out.output
    assert runner.invoke(main, ["analyses", "requeue", str(failed)]).exit_code == 1  # nothing to requeue now
    assert _state(database, failed) == "pending" and _state(database, stranded) == "pending"
    assert audit_kinds(database, "requeued") == ["requeued", "requeued"]


def test_lease_settings_are_validated() -> None:
    s = LocusSettings(analysis={"lease_s": 30, "lease_renew_s": 10, "max_attempts": 5})
    assert (s.analysis.lease_s, s.analysis.lease_renew_s, s.analysis.max_attempts) == (30, 10, 5)
    with pytest.raises(ValidationError, match="lease_renew_s"):
        LocusSettings(analysis={"lease_s": 30, "lease_renew_s": 20})
    with pytest.raises(ValidationError):
        LocusSettings(analysis={"max_attempts": 0})


# ------------------------------------------------------------------ the job (SQLite, real analysis)


def _node(tmp_path: Path, **analysis: float) -> LocusSettings:
    return LocusSettings(storage={"data_dir": str(tmp_path / "locus")}, analysis=analysis)


def test_unwritable_reports_directory_fails_the_version_with_an_audit_row(tmp_path: Path) -> None:
    settings = _node(tmp_path)
    settings.storage.data_dir.mkdir(parents=True)
    settings.storage.reports_dir.parent.mkdir(parents=True, exist_ok=True)
    settings.storage.reports_dir.write_text("not a directory")  # the SR cannot be written under it
    ctx = build_context(settings)
    try:
        with pytest.raises(AssertionError):  # the helper expects "analysed"
            ingest_and_analyse(ctx)
        with ctx.db.session(readonly=True) as s:
            (version,) = s.scalars(select(StudyVersion)).all()
            analysis = s.scalars(select(Analysis)).one()
            assert version.state == "failed"
            assert (analysis.status, analysis.reason_code, analysis.lease_owner) == ("failed", "internal_error", None)
            assert analysis.reason_text and ("Error" in analysis.reason_text)
            assert s.scalars(select(Report)).all() == []
        failed = _audit(ctx.db, "failed")
        assert len(failed) == 1 and failed[0]["code"] == "internal_error"
    finally:
        ctx.db.dispose()


def _run_paused(ctx, vid: int, hook: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Thread, list[str]]:  # type: ignore[no-untyped-def]
    pause_after_claim.install(monkeypatch)
    monkeypatch.setenv(PAUSE_AFTER_CLAIM_ENV, str(hook))
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(jobs.run_analysis(ctx, vid)), daemon=True)
    thread.start()
    wait_until(lambda: list(hook.glob(f"claimed-{vid}-*")), "the claim", timeout=60)
    return thread, outcome


def _ingest_only(ctx) -> int:  # type: ignore[no-untyped-def]
    """The demo study filed and declared complete, without running the job."""
    original = jobs.run_analysis
    try:
        jobs.run_analysis = lambda _ctx, _vid: "analysed"  # type: ignore[assignment]
        ingest_and_analyse(ctx)
    finally:
        jobs.run_analysis = original  # type: ignore[assignment]
    with ctx.db.session(readonly=True) as s:
        return int(s.scalars(select(StudyVersion.id)).one())


def test_lease_duration_and_renewal_settings_take_effect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _node(tmp_path, lease_s=600, lease_renew_s=0.2)
    ctx = build_context(settings)
    hook = tmp_path / "hook"
    hook.mkdir()
    try:
        vid = _ingest_only(ctx)
        thread, outcome = _run_paused(ctx, vid, hook, monkeypatch)
        started = _analysis(ctx.db).started_at
        # The heartbeat renews (every lease_renew_s) a lease of lease_s while the job works.
        wait_until(lambda: _analysis(ctx.db).lease_expires_at > started + timedelta(seconds=600), "a renewal", 60)
        (hook / "release").touch()
        thread.join(timeout=300)
        assert outcome == ["analysed"]
        a = _analysis(ctx.db)
        assert (a.status, a.lease_owner, a.lease_expires_at) == ("succeeded", None, None)
    finally:
        ctx.db.dispose()


def test_a_worker_whose_lease_was_reclaimed_stores_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fencing in the real job: the sweeper reclaims a lease (max_attempts = 1 fails the
    version) while the worker is stalled; the worker then discards its result."""
    settings = _node(tmp_path, lease_s=600, lease_renew_s=300, max_attempts=1)
    ctx = build_context(settings)
    hook = tmp_path / "hook"
    hook.mkdir()
    try:
        vid = _ingest_only(ctx)
        thread, outcome = _run_paused(ctx, vid, hook, monkeypatch)
        a = _analysis(ctx.db)
        assert a.lease_expires_at == a.started_at + timedelta(seconds=600)  # analysis.lease_s
        from node.service import reclaim_expired

        assert reclaim_expired(ctx, a.started_at + timedelta(seconds=601)) == []  # max_attempts = 1: failed
        (hook / "release").touch()
        thread.join(timeout=300)
        assert outcome == ["lost"]
        a = _analysis(ctx.db)
        assert (_state(ctx.db, vid), a.reason_code) == ("failed", "attempts_exhausted")
        with ctx.db.session(readonly=True) as s:
            assert s.scalars(select(Report)).all() == []
        assert not any(os.scandir(settings.storage.reports_dir)) if settings.storage.reports_dir.exists() else True
    finally:
        ctx.db.dispose()
