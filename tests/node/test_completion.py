"""Study completion rules and the sweep, on SQLite and PostgreSQL.

Times are explicit (``now`` arguments), so no test sleeps or depends on the clock,
except the concurrency tests, which need real threads.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from node import completion
from node.db import Database, repo
from node.db.models import AuditEvent, Study, StudyVersion
from node.settings import CompletionSettings

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)
CFG = CompletionSettings(series_quiet_s=5, study_quiet_s=60, force_complete_s=300, sweep_interval_s=1)

STUDY = "1.2.826.0.1.3680043.10.2.1"
CT = "1.2.826.0.1.3680043.10.2.2"
PET = "1.2.826.0.1.3680043.10.2.3"
SEG = "1.2.826.0.1.3680043.10.2.4"
FOR = "1.2.826.0.1.3680043.10.2.9"
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "SEG": "1.2.840.10008.5.1.4.1.1.66.4",
}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def sop(series: str, n: int) -> str:
    return f"{series}.{n}"


def receive(
    database: Database,
    series: str,
    modality: str,
    numbers: range | list[int],
    when: datetime,
    *,
    slices: int | None = None,
    frame_of_reference: str | None = FOR,
    refs: list[tuple[str, str]] | None = None,
) -> None:
    with database.session() as s:
        for n in numbers:
            repo.record_instance(
                s,
                repo.InstanceRecord(
                    study_uid=STUDY,
                    series_uid=series,
                    sop_uid=sop(series, n),
                    sop_class_uid=SOP_CLASS[modality],
                    modality=modality,
                    transfer_syntax="1.2.840.10008.1.2.1",
                    path=f"{STUDY}/{series}/{n}.dcm",
                    size_bytes=500,
                    calling_ae="PACS",
                    frame_of_reference_uid=frame_of_reference,
                    number_of_slices=slices,
                    instance_number=n,
                    referenced_instances=refs or [],
                ),
                when,
            )


def sweep(database: Database, when: datetime, cfg: CompletionSettings = CFG) -> list[int]:
    with database.session() as s:
        return completion.sweep(s, when, cfg)


def versions(database: Database) -> list[tuple[int, str, str, int]]:
    with database.session() as s:
        return [
            (v.version, v.state, v.completion_rule, v.instance_count)
            for v in s.scalars(select(StudyVersion).order_by(StudyVersion.version))
        ]


def complete_events(database: Database) -> list[dict[str, object]]:
    with database.session() as s:
        return [
            dict(e.detail or {})
            for e in s.scalars(select(AuditEvent).where(AuditEvent.kind == "complete").order_by(AuditEvent.id))
        ]


# ----------------------------------------------------------------- rules


def test_reference_complete_with_a_seg_referencing_only_some_pet_slices(database: Database) -> None:
    receive(database, CT, "CT", range(1, 11), at(0))
    receive(database, PET, "PT", range(1, 6), at(1), slices=10)  # 5 of 10 PET slices so far
    # The SEG references three PET slices (the ones with lesions), all already present.
    refs = [(PET, sop(PET, n)) for n in (2, 3, 4)]
    receive(database, SEG, "SEG", [1], at(2), refs=refs, frame_of_reference=FOR)

    # References present, but the PET series is not complete by its Number of Slices.
    assert sweep(database, at(20)) == []
    receive(database, PET, "PT", range(6, 11), at(21), slices=10)
    # The PET is complete by count at once and the CT has been quiet since 0 s, but the
    # study itself must be quiet for series_quiet_s (another series may follow in the
    # same stream); then it fires, long before study_quiet_s.
    assert sweep(database, at(25.9)) == []
    ids = sweep(database, at(26))
    assert len(ids) == 1
    assert versions(database) == [(1, "pending", "reference_complete", 21)]
    (event,) = complete_events(database)
    assert event["rule"] == "reference_complete" and event["version"] == 1 and event["instances"] == 21
    with database.session() as s:
        assert len(repo.instances_for_version(s, ids[0])) == 21
        assert s.scalars(select(Study.pending_since)).one() is None
        assert s.scalars(select(Study.status)).one() == "pending"
    assert sweep(database, at(27)) == []  # exactly once


def test_reference_complete_waits_for_a_missing_referenced_image(database: Database) -> None:
    receive(database, CT, "CT", range(1, 4), at(0))
    receive(database, SEG, "SEG", [1], at(0), refs=[(CT, sop(CT, 2)), (CT, sop(CT, 7))])
    assert sweep(database, at(30)) == []  # CT slice 7 is referenced but absent; study not yet quiet
    receive(database, CT, "CT", [7], at(31))
    assert sweep(database, at(33)) == []  # CT not yet quiet for series_quiet_s
    assert len(sweep(database, at(36))) == 1
    assert versions(database) == [(1, "pending", "reference_complete", 5)]


def test_reference_complete_waits_for_other_series_still_arriving(database: Database) -> None:
    receive(database, PET, "PT", range(1, 4), at(0), slices=3)
    receive(database, SEG, "SEG", [1], at(0), refs=[(PET, sop(PET, 2))])
    receive(database, CT, "CT", range(1, 4), at(9))  # a CT is still streaming in
    assert sweep(database, at(10)) == []
    assert len(sweep(database, at(14))) == 1
    assert versions(database)[0][2] == "reference_complete"


def test_count_complete_needs_a_quiet_ct_in_the_same_frame_of_reference(database: Database) -> None:
    receive(database, CT, "CT", range(1, 6), at(0))
    receive(database, PET, "PT", range(1, 4), at(1), slices=4)
    assert sweep(database, at(10)) == []  # 3 of 4 PET slices
    receive(database, PET, "PT", [4], at(11), slices=4)
    assert sweep(database, at(15.9)) == []  # the last slice just arrived: the study is not quiet yet
    ids = sweep(database, at(16))
    assert len(ids) == 1
    assert versions(database) == [(1, "pending", "count_complete", 9)]
    (event,) = complete_events(database)
    assert "4/4" in str(event["reason"])


def test_a_seg_following_the_last_pet_slice_in_the_same_stream_is_not_cut_off(database: Database) -> None:
    """CT, PET, then the SEG in one association (a common sending order): a sweep between
    the last PET slice and the SEG must not declare the study without its SEG."""
    receive(database, CT, "CT", range(1, 6), at(0))
    receive(database, PET, "PT", range(1, 5), at(6), slices=4)  # complete by count; CT quiet for 6 s
    assert sweep(database, at(6.01)) == []
    receive(database, SEG, "SEG", [1], at(6.02), refs=[(PET, sop(PET, 2))])
    assert sweep(database, at(11.01)) == []
    (v1,) = sweep(database, at(11.02))
    assert versions(database) == [(1, "pending", "reference_complete", 10)]
    with database.session() as s:
        assert sop(SEG, 1) in {i.sop_uid for i in repo.instances_for_version(s, v1)}


def test_count_complete_ignores_a_ct_in_another_frame_of_reference(database: Database) -> None:
    receive(database, CT, "CT", range(1, 6), at(0), frame_of_reference="9.9.9")
    receive(database, PET, "PT", range(1, 5), at(1), slices=4)
    assert sweep(database, at(30)) == []
    ids = sweep(database, at(61))  # falls back to the study quiet timer
    assert len(ids) == 1 and versions(database)[0][2] == "quiet_timer"


def test_quiet_timer(database: Database) -> None:
    receive(database, CT, "CT", range(1, 4), at(0))
    receive(database, CT, "CT", [4], at(10))
    assert sweep(database, at(69)) == []
    assert len(sweep(database, at(70))) == 1
    assert versions(database) == [(1, "pending", "quiet_timer", 4)]


def test_force_complete_caps_a_study_that_never_goes_quiet(database: Database) -> None:
    for i in range(10):  # an instance every 30 s: never quiet for 60 s, below the 300 s cap
        receive(database, CT, "CT", [i + 1], at(30 * i))
        assert sweep(database, at(30 * i + 29)) == []
    receive(database, CT, "CT", [11], at(299))
    assert len(sweep(database, at(300))) == 1  # 300 s after the first instance
    assert versions(database) == [(1, "pending", "force_complete", 11)]
    (event,) = complete_events(database)
    assert event["rule"] == "force_complete"


def test_resend_does_not_reopen_a_complete_study(database: Database) -> None:
    receive(database, CT, "CT", range(1, 3), at(0))
    assert len(sweep(database, at(60))) == 1
    receive(database, CT, "CT", range(1, 3), at(100))  # the same two instances again
    assert sweep(database, at(1000)) == []
    assert [v[0] for v in versions(database)] == [1]


# ----------------------------------------------------------------- versions


def test_late_instance_after_analysis_creates_version_two_with_all_instances(database: Database) -> None:
    receive(database, CT, "CT", range(1, 4), at(0))
    (v1,) = sweep(database, at(60))
    with database.session() as s:
        repo.mark_queued(s, [v1], at(60))
        assert repo.claim_analysis(s, v1, at(61))
    receive(database, CT, "CT", [4], at(62))  # arrives while version 1 is analysed
    with database.session() as s:
        assert s.scalars(select(Study.has_late_instances)).one()
    assert sweep(database, at(200)) == []  # serialised: v2 waits for v1's analysis
    with database.session() as s:
        repo.store_analysis_result(s, v1, {"lesions": []}, [], None, at(201))
    (v2,) = sweep(database, at(201))
    assert versions(database) == [(1, "analysed", "quiet_timer", 3), (2, "pending", "quiet_timer", 4)]
    with database.session() as s:
        assert [i.sop_uid for i in repo.instances_for_version(s, v2)] == [sop(CT, n) for n in (1, 2, 3, 4)]
        assert not s.scalars(select(Study.has_late_instances)).one()


def test_a_stuck_analysis_does_not_block_a_new_version_forever(database: Database) -> None:
    receive(database, CT, "CT", range(1, 3), at(0))
    (v1,) = sweep(database, at(60))
    with database.session() as s:
        assert repo.claim_analysis(s, v1, at(61))
    receive(database, CT, "CT", [3], at(62))
    assert sweep(database, at(61 + CFG.force_complete_s - 1)) == []
    assert len(sweep(database, at(61 + CFG.force_complete_s))) == 1


def test_late_instance_before_analysis_supersedes_the_waiting_version(database: Database) -> None:
    receive(database, CT, "CT", range(1, 3), at(0))
    (v1,) = sweep(database, at(60))
    with database.session() as s:
        repo.mark_queued(s, [v1], at(60))
    receive(database, CT, "CT", [3], at(61))
    (v2,) = sweep(database, at(121))
    assert versions(database) == [(1, "superseded", "quiet_timer", 2), (2, "pending", "quiet_timer", 3)]
    with database.session() as s:
        assert not repo.claim_analysis(s, v1, at(122))  # the queued task for v1 does nothing
        assert repo.claim_analysis(s, v2, at(122))
        kinds = list(s.scalars(select(AuditEvent.kind).where(AuditEvent.kind != "received").order_by(AuditEvent.id)))
    assert kinds == ["complete", "queued", "superseded", "complete", "started"]


def _broker_messages(broker_url: str, queue: str) -> list[list[object]]:
    """Drain ``queue`` of the real (embedded) broker; the analysis task's positional args."""
    from kombu import Connection

    args: list[list[object]] = []
    with Connection(broker_url) as conn:
        q = conn.SimpleQueue(queue)
        while True:
            try:
                message = q.get(timeout=0.5)
            except q.Empty:
                break
            args.append(list(message.payload[0]))  # Celery message protocol 2: [args, kwargs, embed]
            message.ack()
        q.close()
    return args


def test_versions_queued_too_long_are_enqueued_again_once_and_audited(database: Database, tmp_path: Path) -> None:
    """A lost broker message must not leave a version queued forever (re-published, audited)."""
    from node.service import requeue_stale
    from node.settings import LocusSettings
    from node.storage import LocalSpool
    from node.tasks.celery_app import GPU_QUEUE, configure_app
    from node.tasks.context import WorkerContext

    broker = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    settings = LocusSettings.load(
        None,
        storage={"data_dir": str(tmp_path)},
        broker={"url": broker},
        completion={"series_quiet_s": 5, "study_quiet_s": 60, "force_complete_s": 300, "requeue_stale_s": 120},
    )
    ctx = WorkerContext(settings=settings, db=database, spool=LocalSpool(tmp_path / "spool"))
    configure_app(settings.broker)

    receive(database, CT, "CT", range(1, 3), at(0))
    receive(database, PET, "PT", range(1, 3), at(0))
    (v1,) = sweep(database, at(60))
    with database.session() as s:
        repo.mark_queued(s, [v1], at(60))  # ... and its message is lost: nothing in the broker

    assert requeue_stale(ctx, at(60 + 119)) == []  # not stale yet
    assert requeue_stale(ctx, at(60 + 121)) == [v1]
    assert requeue_stale(ctx, at(60 + 122)) == []  # queued_at restarted: not re-sent every sweep
    assert _broker_messages(broker, GPU_QUEUE) == [[v1]]

    with database.session() as s:
        row = s.scalars(select(StudyVersion).where(StudyVersion.id == v1)).one()
        assert (row.state, row.queued_at) == ("queued", at(181))
        audit = s.scalars(select(AuditEvent).where(AuditEvent.kind == "requeued")).one()
        assert audit.study_uid == STUDY
        assert audit.detail == {"version": 1, "reason": "stale_queued", "queued_for_s": 121.0}

    # Still unclaimed after another bound: sent again. Once claimed: never again.
    assert requeue_stale(ctx, at(181 + 121)) == [v1]
    with database.session() as s:
        assert repo.claim_analysis(s, v1, at(400))
    assert requeue_stale(ctx, at(10_000)) == []
    assert _broker_messages(broker, GPU_QUEUE) == [[v1]]


# ----------------------------------------------------------------- exactly once


def test_two_concurrent_sweeps_create_one_version(database: Database) -> None:
    receive(database, CT, "CT", range(1, 4), at(0))
    barrier = threading.Barrier(2)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(timeout=10)
            results.append(sweep(database, at(60)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert sorted(len(r) for r in results) == [0, 1]
    assert versions(database) == [(1, "pending", "quiet_timer", 3)]
    assert len(complete_events(database)) == 1


def test_a_sweep_that_lost_the_race_creates_nothing(database: Database) -> None:
    """Sweeper A holds its uncommitted version while sweeper B evaluates the same study.

    B must wait (SQLite: for the write lock; PostgreSQL: for the study row lock) and,
    once A commits, find the study no longer pending.
    """
    receive(database, CT, "CT", range(1, 4), at(0))
    outcome: dict[str, object] = {}
    with database.session() as session_a:
        ids_a = completion.sweep(session_a, at(60), CFG)
        assert len(ids_a) == 1

        def sweeper_b() -> None:
            try:
                outcome["ids"] = sweep(database, at(60))
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=sweeper_b)
        thread.start()
        thread.join(timeout=0.5)  # B is blocked while A's transaction is open
        assert thread.is_alive()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["ids"] == []
    with database.session() as s:
        assert s.scalar(select(func.count(StudyVersion.id))) == 1


def test_evaluate_is_pure_and_names_the_rule() -> None:
    pet = repo.SeriesState(PET, "PT", SOP_CLASS["PT"], FOR, 2, 2, at(0))
    ct = repo.SeriesState(CT, "CT", SOP_CLASS["CT"], FOR, None, 3, at(0))
    snap = repo.StudySnapshot(
        study_id=1,
        study_uid=STUDY,
        first_received_at=at(0),
        last_received_at=at(0),
        pending_since=at(0),
        latest_version=0,
        latest_state=None,
        latest_started_at=None,
        series=(pet, ct),
        segs=(),
        present_referenced=frozenset(),
    )
    assert completion.evaluate(snap, at(4), CFG) is None  # CT (and the study) not quiet yet
    decision = completion.evaluate(snap, at(5), CFG)
    assert decision is not None and decision.rule == "count_complete"
    assert completion.series_complete(pet, at(0), CFG)  # by count, immediately
    done = repo.StudySnapshot(**{**snap.__dict__, "pending_since": None})
    assert completion.evaluate(done, at(1000), CFG) is None
