"""A node that analysed the bundled demo study and had two lesions reviewed, for export tests.

Shared by ``tests/node/test_review_export.py`` (export -> reader) and
``tests/training/test_finetune_from_export.py`` (export -> fine-tuning).  The demo study
(``node/demo_study``) is filed into a node's spool and results database through the node's
own ingest functions (spool ``put_atomic``, the listener's ``index_fields``,
``repo.record_instance``), declared complete, and analysed by the worker's job function with
the localizer release given; then lesion ``CONFIRMED``'s prediction is confirmed and
``LESION`` is corrected to ``SITE`` and confirmed by a second reader.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from library import load_library
from node import jobs
from node.cli import main
from node.cli_demo import SAMPLE_STUDY
from node.db import Database, repo
from node.db.models import Lesion
from node.db.reviews import confirm_location, correct_location
from node.listener.parsing import index_fields
from node.settings import LocusSettings
from node.tasks.context import WorkerContext, build_context

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
CONFIRMED = "S1"  # its predicted site confirmed as is
LESION = "S2"  # corrected, then confirmed
SITE = "liver_s7"


def ingest_and_analyse(ctx: WorkerContext) -> tuple[str, int]:
    """File every instance of the demo study, close the study, run the analysis job; (Study UID, files)."""
    files = sorted(SAMPLE_STUDY.rglob("*.dcm"))
    with ctx.db.session() as s:
        for path in files:
            data = path.read_bytes()
            f = index_fields(data)
            rel = ctx.spool.put_atomic(f.study_uid, f.series_uid, f.sop_uid, data)
            repo.record_instance(s, repo.InstanceRecord(
                study_uid=f.study_uid, series_uid=f.series_uid, sop_uid=f.sop_uid, sop_class_uid=f.sop_class_uid,
                modality=f.modality, transfer_syntax=str(pydicom.dcmread(path, stop_before_pixels=True)
                                                         .file_meta.TransferSyntaxUID),
                path=rel, size_bytes=len(data), calling_ae="SENDER",
                frame_of_reference_uid=f.frame_of_reference_uid, number_of_slices=f.number_of_slices,
                instance_number=f.instance_number, referenced_instances=f.referenced_instances,
            ), T0)
    with ctx.db.session() as s:
        (study_id,) = repo.pending_study_ids(s)
        snap = repo.lock_study(s, study_id)
        assert snap is not None
        vid = repo.create_study_version(s, snap, rule="quiet_timer", reason="test", now=T0 + timedelta(minutes=1))
        assert vid is not None
    assert jobs.run_analysis(ctx, vid) == "analysed"
    return snap.study_uid, len(files)


def analysed_and_reviewed_node(data_dir: Path, localizer_release: Path) -> tuple[LocusSettings, str]:
    """Settings of a node (data under ``data_dir``) that analysed and reviewed the demo study."""
    settings = LocusSettings(storage={"data_dir": str(data_dir)},
                             models={"localizer_checkpoint": str(localizer_release), "device": "cpu"})
    ctx = build_context(settings)
    try:
        study_uid, _ = ingest_and_analyse(ctx)
        library = load_library()
        with ctx.db.session() as s:
            confirm_location(s, study_uid, CONFIRMED, reviewer="Dr Ada", now=T0 + timedelta(minutes=30),
                             library=library)
        with ctx.db.session() as s:
            correct_location(s, study_uid, LESION, SITE, reviewer="Dr Ada", now=T0 + timedelta(hours=1),
                             library=library, note="patient Jane Doe, segment VII")
        with ctx.db.session() as s:
            confirm_location(s, study_uid, LESION, reviewer="Dr Bo", now=T0 + timedelta(hours=2), library=library)
    finally:
        ctx.db.dispose()
    return settings, study_uid


def run_cli(settings: LocusSettings, monkeypatch: pytest.MonkeyPatch, *args: str) -> Result:
    """``locus ARGS`` against ``settings`` (in process)."""
    monkeypatch.setattr(LocusSettings, "load", classmethod(lambda cls, *a, **k: settings))
    return CliRunner().invoke(main, list(args))


def lesion_rows(settings: LocusSettings) -> dict[str, SimpleNamespace]:
    """What the analysis stored per lesion of the node's one study, by lesion id."""
    database = Database(settings.database.url)
    try:
        with database.session(readonly=True) as s:
            return {row.lesion_id: SimpleNamespace(site_id=row.site_id, voxel_count=row.voxel_count,
                                                   suv_max=row.suv_max, localization=row.localization)
                    for row in s.scalars(select(Lesion))}
    finally:
        database.dispose()
