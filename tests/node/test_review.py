"""Location reviews: migration 0002, repository functions and the `locus review` CLI.

Every database test runs on SQLite and PostgreSQL (``database`` fixture in conftest.py).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import func, inspect, select

from library import load_library
from node.cli import main
from node.db import Database, repo
from node.db.base import Base, alembic_config
from node.db.models import AuditEvent, LocationReview
from node.db.reviews import (
    ReviewError,
    confirm_location,
    correct_location,
    dataset_studies,
    list_reviews,
)
from node.settings import LocusSettings
from tests.node.test_db import CT_SERIES, STUDY, T0, analysis_result, rec, received_version, store

LIB = load_library()
T1, T2, T3 = (T0 + timedelta(hours=h) for h in (1, 2, 3))


def review_audits(database: Database) -> list[AuditEvent]:
    with database.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.kind == "location_reviewed").order_by(AuditEvent.id)))


def review_count(database: Database) -> int:
    with database.session() as s:
        return int(s.scalar(select(func.count(LocationReview.id))) or 0)


def test_migration_0002_adds_location_reviews_on_top_of_0001(db_url: str) -> None:
    script = ScriptDirectory.from_config(alembic_config())
    rev = script.get_revision("0002")
    assert rev is not None and rev.down_revision == "0001"
    database = Database(db_url)
    try:
        database.upgrade("0002")
        assert database.current_revision() == "0002"
        with database.engine.connect() as conn:
            insp = inspect(conn)
            columns = {c["name"] for c in insp.get_columns("location_reviews")}
            fks = insp.get_foreign_keys("location_reviews")
        assert {"lesion_row_id", "action", "site_id", "site_code", "site_scheme", "site_name", "predicted_site_id",
                "previous_site_id", "reviewer", "at", "note", "library_version", "library_hash"} <= columns
        assert [(fk["referred_table"], fk["options"].get("ondelete")) for fk in fks] == [("lesions", "CASCADE")]
        with database.engine.connect() as conn:  # the model matches the migration (other tables: their own tests)
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert [d for d in diff if "location_reviews" in repr(d)] == []
        from alembic import command

        with database.engine.connect() as conn:
            cfg = alembic_config(conn)
            command.downgrade(cfg, "0001")
            conn.commit()
        with database.engine.connect() as conn:
            assert "location_reviews" not in inspect(conn).get_table_names()
        database.upgrade()
        with database.engine.connect() as conn:
            assert "location_reviews" in inspect(conn).get_table_names()
    finally:
        database.dispose()


def test_confirm_correct_keep_history_latest_wins_and_audit(database: Database) -> None:
    store(database, received_version(database), "1.2.9.1")
    with database.session() as s:
        first = confirm_location(s, STUDY, "S1", reviewer=" Dr Ada ", now=T1, library=LIB, note="agree")
    assert (first.action, first.site_id, first.predicted_site_id, first.previous_site_id) == (
        "confirm", "liver", "liver", "liver")
    assert (first.reviewer, first.note, first.version, first.site_name) == ("Dr Ada", "agree", 1, "Liver")
    assert (first.library_version, first.library_hash) == (LIB.version, LIB.content_hash)
    assert first.at == T1

    with database.session() as s:
        corrected = correct_location(s, STUDY, "S1", "liver_s7", reviewer="Dr Bo", now=T2, library=LIB)
    assert (corrected.action, corrected.site_id, corrected.previous_site_id, corrected.predicted_site_id) == (
        "correct", "liver_s7", "liver", "liver")
    assert (corrected.site_scheme, corrected.site_code) == (LIB.site("liver_s7").code.scheme,
                                                           LIB.site("liver_s7").code.value)
    with database.session() as s:
        again = confirm_location(s, STUDY, "S1", reviewer="Dr Ada", now=T3, library=LIB)
    assert (again.site_id, again.previous_site_id) == ("liver_s7", "liver_s7")  # confirms the correction

    with database.session(readonly=True) as s:
        history = list_reviews(s, STUDY)
        latest = list_reviews(s, STUDY, latest_only=True)
        other = list_reviews(s, "9.9.9")
    assert [(r.action, r.site_id, r.reviewer) for r in history] == [
        ("confirm", "liver", "Dr Ada"), ("correct", "liver_s7", "Dr Bo"), ("confirm", "liver_s7", "Dr Ada")]
    assert [(r.lesion_id, r.site_id, r.at) for r in latest] == [("S1", "liver_s7", T3)]
    assert other == []

    audits = review_audits(database)
    assert len(audits) == 3
    assert audits[1].study_uid == STUDY and audits[1].at == T2
    assert audits[1].detail == {
        "version": 1, "lesion_id": "S1", "action": "correct", "site_id": "liver_s7", "previous_site_id": "liver",
        "predicted_site_id": "liver", "reviewer": "Dr Bo", "review_id": corrected.id,
    }
    assert audits[1].sop_uid == "1.2.826.0.1.3680043.10.1.9.1"  # the SEG the lesion came from


def test_unknown_site_and_region_are_refused_without_a_trace(database: Database) -> None:
    store(database, received_version(database), "1.2.9.1")
    with pytest.raises(ReviewError, match="unknown anatomical site id 'liver_s9'") as exc, database.session() as s:
        correct_location(s, STUDY, "S2", "liver_s9", reviewer="Dr Ada", now=T1, library=LIB)
    assert exc.value.code == "unknown_site"
    with pytest.raises(ReviewError, match="whole body region") as exc, database.session() as s:
        correct_location(s, STUDY, "S2", "head", reviewer="Dr Ada", now=T1, library=LIB)
    assert exc.value.code == "site_too_coarse"
    with pytest.raises(ReviewError) as exc, database.session() as s:
        confirm_location(s, STUDY, "S2", reviewer="  ", now=T1, library=LIB)
    assert exc.value.code == "reviewer_missing"
    assert review_count(database) == 0 and review_audits(database) == []


def test_unknown_study_lesion_and_unanalysed_study(database: Database) -> None:
    vid = received_version(database)
    with pytest.raises(ReviewError, match="has no successful analysis yet") as exc, database.session() as s:
        confirm_location(s, STUDY, "S1", reviewer="Dr Ada", now=T1, library=LIB)
    assert exc.value.code == "not_analysed"
    store(database, vid, "1.2.9.1")
    with pytest.raises(ReviewError, match=r"has no lesion 'S7' \(lesions: S1, S2\)") as exc, database.session() as s:
        confirm_location(s, STUDY, "S7", reviewer="Dr Ada", now=T1, library=LIB)
    assert exc.value.code == "unknown_lesion"
    with pytest.raises(ReviewError, match=r"no study with Study Instance UID 9\.9\.9") as exc, database.session() as s:
        confirm_location(s, "9.9.9", "S1", reviewer="Dr Ada", now=T1, library=LIB)
    assert exc.value.code == "unknown_study"


def test_nothing_to_confirm_without_a_prediction(database: Database) -> None:
    vid = received_version(database)
    result = analysis_result(1)
    result.lesions = [dataclasses.replace(les, localization=None) for les in result.lesions]
    payload = result.to_json()
    with database.session() as s:
        assert repo.claim_analysis(s, vid, T0 + timedelta(minutes=3))
        repo.store_analysis_result(s, vid, payload, payload["lesions"], None, T0 + timedelta(minutes=4))
    with pytest.raises(ReviewError, match="has no location to confirm") as exc, database.session() as s:
        confirm_location(s, STUDY, "S1", reviewer="Dr Ada", now=T1, library=LIB)
    assert exc.value.code == "nothing_to_confirm"
    with database.session() as s:
        row = correct_location(s, STUDY, "S1", "liver_s2", reviewer="Dr Ada", now=T1, library=LIB)
    assert (row.predicted_site_id, row.previous_site_id, row.site_id) == (None, None, "liver_s2")


def test_review_and_its_audit_roll_back_together(database: Database) -> None:
    store(database, received_version(database), "1.2.9.1")
    with pytest.raises(RuntimeError), database.session() as s:
        confirm_location(s, STUDY, "S1", reviewer="Dr Ada", now=T1, library=LIB)
        raise RuntimeError("crash before commit")
    assert review_count(database) == 0 and review_audits(database) == []


def test_dataset_selection_reviewed_only_and_since(database: Database) -> None:
    store(database, received_version(database), "1.2.9.1")  # analysis finished at T0 + 4 min
    with database.session(readonly=True) as s:
        assert dataset_studies(s) == []
        (study,) = dataset_studies(s, reviewed_only=False)
    assert (study.study_uid, study.version, len(study.instance_paths)) == (STUDY, 1, 3)
    assert [(les.lesion_id, les.predicted_site_id, les.review) for les in study.lesions] == [
        ("S1", "liver", None), ("S2", "liver", None)]
    assert study.lesions[0].coarse_ranking == ("abdomen",)
    assert study.lesions[0].bbox == {"center_mm": [10.0, -20.0, 30.0], "size_mm": [15.0, 15.0, 15.0]}

    with database.session() as s:
        correct_location(s, STUDY, "S2", "liver_s7", reviewer="Dr Ada", now=T2, library=LIB)
    with database.session(readonly=True) as s:
        (study,) = dataset_studies(s)
        assert dataset_studies(s, since=T2) == [study]  # reviewed at T2
        assert dataset_studies(s, since=T3) == []
        assert len(dataset_studies(s, reviewed_only=False, since=T0)) == 1  # analysed after T0
    assert study.reviewed and study.lesions[0].review is None
    review = study.lesions[1].review
    assert review is not None and (review.site_id, review.reviewer) == ("liver_s7", "Dr Ada")


def test_reviews_follow_the_seg_lesion_into_a_new_study_version(database: Database) -> None:
    """Late instances re-analyse the study; the same SEG segment keeps its review."""
    store(database, received_version(database), "1.2.9.1")
    with database.session() as s:
        correct_location(s, STUDY, "S1", "liver_s7", reviewer="Dr Ada", now=T1, library=LIB)
    with database.session() as s:
        repo.record_instance(s, rec(f"{CT_SERIES}.9", instance_number=9), T1)
    with database.session() as s:
        (study_id,) = repo.pending_study_ids(s)
        snap = repo.lock_study(s, study_id)
        assert snap is not None
        vid2 = repo.create_study_version(s, snap, rule="quiet_timer", reason="late", now=T1 + timedelta(minutes=2))
        assert vid2 is not None
    store(database, vid2, "1.2.9.2", predecessor="1.2.9.1")

    with database.session(readonly=True) as s:
        (study,) = dataset_studies(s)
    assert study.version == 2
    carried = study.lesions[0].review
    assert carried is not None and (carried.site_id, carried.version) == ("liver_s7", 1)
    assert study.lesions[1].review is None

    with database.session() as s:  # confirming on version 2 confirms the carried correction
        row = confirm_location(s, STUDY, "S1", reviewer="Dr Bo", now=T2, library=LIB)
    assert (row.version, row.site_id, row.previous_site_id, row.predicted_site_id) == (2, "liver_s7", "liver_s7",
                                                                                       "liver")
    with database.session(readonly=True) as s:
        assert [(r.version, r.action) for r in list_reviews(s, STUDY)] == [(1, "correct"), (2, "confirm")]
        assert [(r.version, r.reviewer) for r in list_reviews(s, STUDY, latest_only=True)] == [(2, "Dr Bo")]


def _settings(database: Database, tmp_path: Path) -> LocusSettings:
    url = database.url.render_as_string(hide_password=False)
    return LocusSettings(storage={"data_dir": str(tmp_path)}, database={"url": url})


def test_review_cli(database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store(database, received_version(database), "1.2.9.1")
    settings = _settings(database, tmp_path)
    monkeypatch.setattr(LocusSettings, "load", classmethod(lambda cls, *a, **k: settings))
    runner = CliRunner()

    out = runner.invoke(main, ["review", "confirm", STUDY, "S1", "--by", "Dr Ada", "--note", "ok"])
    assert out.exit_code == 0, out.output
    assert f"{STUDY} S1 (version 1): confirmed as Liver [liver, " in out.output and "by Dr Ada" in out.output

    out = runner.invoke(main, ["review", "correct", STUDY, "S1", "liver_s7", "--by", "Dr [Bo]", "--json"])
    assert out.exit_code == 0, out.output
    row = json.loads(out.stdout)
    assert (row["action"], row["site_id"], row["previous_site_id"], row["reviewer"]) == (
        "correct", "liver_s7", "liver", "Dr [Bo]")

    out = runner.invoke(main, ["review", "correct", STUDY, "S1", "no_such_site", "--by", "Dr Bo"])
    assert out.exit_code == 1 and "unknown_site: unknown anatomical site id 'no_such_site'" in out.output
    out = runner.invoke(main, ["review", "confirm", STUDY, "S1"])
    assert out.exit_code == 2 and "--by" in out.output

    out = runner.invoke(main, ["review", "list", STUDY, "--json"])
    assert out.exit_code == 0, out.output
    assert [(r["action"], r["site_id"]) for r in json.loads(out.stdout)] == [
        ("confirm", "liver"), ("correct", "liver_s7")]
    out = runner.invoke(main, ["review", "list", "--latest", "--json"])
    assert [(r["lesion_id"], r["site_id"]) for r in json.loads(out.stdout)] == [("S1", "liver_s7")]
    out = runner.invoke(main, ["review", "list"], terminal_width=250)
    assert out.exit_code == 0 and "2 reviews" in out.output and "liver_s7" in out.output
    assert "Dr [Bo]" in out.output and "Couinaud segment VII" in out.output
