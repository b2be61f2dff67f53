"""Issue 18, "first hour": what a new user meets in the first commands.

* a database at the wrong schema revision stops every command with one line naming
  ``locus db upgrade`` (fresh PostgreSQL database, older and newer SQLite), or is migrated
  where that is automatic; ``locus serve`` exits instead of logging a traceback a second;
* query commands never create a database and name the one they read, password masked;
* an unknown study is "no such study" with a non-zero exit; invalid ``--status`` is refused;
* a second ``locus demo`` in the same data directory shows the stored results at once;
* ``locus echo`` to an unreachable peer prints one line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from node.cli import main
from node.db import Database, repo
from node.db.base import head_revisions
from tests.node import test_db as dbh
from tests.node.conftest import PG_URL, require_postgres

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-pw"


@pytest.fixture
def fresh_pg_database() -> Iterator[str]:
    """URL (with a password, which the local trust authentication ignores) of a new, empty
    PostgreSQL database with a unique name, dropped afterwards."""
    require_postgres()
    name = f"locus_fh_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_URL).set(database=name, password=PASSWORD)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean environment with an empty data directory; returns the data directory."""
    for key in list(os.environ):
        if key.startswith("LOCUS_") and not key.startswith("LOCUS_TEST_"):  # node settings, not test knobs
            monkeypatch.delenv(key)
    data = tmp_path / "data"
    monkeypatch.setenv("LOCUS_DATA_DIR", str(data))
    return data


def invoke(*argv: str, **kw: object) -> object:
    return CliRunner().invoke(main, list(argv), **kw)  # type: ignore[arg-type]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


# ----------------------------------------------------------------- schema revision (item 1)


@pytest.mark.postgres
def test_unmigrated_postgres_stops_queries_with_one_line(fresh_pg_database: str, env: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCUS_DATABASE__URL", fresh_pg_database)
    for argv in (["results", "studies"], ["results", "show", "1.2.3"], ["exports", "list"], ["review", "list"]):
        result = invoke(*argv)
        assert result.exit_code == 1, result.output
        lines = error_lines(result.output)
        assert len(lines) == 1, result.output
        assert "has no Locus schema yet" in lines[0] and "run `locus db upgrade`" in lines[0]
        assert PASSWORD not in result.output and "postgres:***@" in lines[0]
    result = invoke("db", "upgrade")
    assert result.exit_code == 0 and PASSWORD not in result.output and "postgres:***@" in result.output
    result = invoke("results", "studies")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("database: postgresql+psycopg://postgres:***@")
    assert "0 studies" in result.output


@pytest.mark.postgres
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_service_on_unmigrated_postgres_exits_with_one_line(fresh_pg_database: str, env: Path, command: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "LOCUS_DATABASE__URL": fresh_pg_database,
               "LOCUS_DICOM__HOST": "127.0.0.1", "LOCUS_DATA_DIR": str(env)}
    argv = ["serve", "--port", str(port)] if command == "serve" else ["worker"]
    proc = subprocess.run([sys.executable, "-c", "from node.cli import main; main()", *argv],
                          capture_output=True, text=True, env=environ, cwd=env.parent, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "run `locus db upgrade`" in lines[0], proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout


@pytest.mark.postgres
def test_demo_on_unmigrated_postgres_sends_nothing_and_says_why(fresh_pg_database: str, env: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCUS_DATABASE__URL", fresh_pg_database)
    result = invoke("demo", "--data-dir", str(env), "--timeout", "5")
    assert result.exit_code == 1, result.output
    assert "run `locus db upgrade`" in result.output and "sent " not in result.output
    assert PASSWORD not in result.output


def test_older_sqlite_without_auto_upgrade_is_refused_and_migrated_with_it(env: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    database = Database(f"sqlite:///{env / 'locus.db'}")
    database.upgrade("0002")
    database.dispose()
    (head,) = head_revisions()
    monkeypatch.setenv("LOCUS_DATABASE__AUTO_UPGRADE", "false")
    result = invoke("results", "studies")
    assert result.exit_code == 1
    assert error_lines(result.output) == [
        f"Error: database sqlite:///{env / 'locus.db'} is at revision 0002, this Locus needs {head}: "
        "run `locus db upgrade`"]
    monkeypatch.delenv("LOCUS_DATABASE__AUTO_UPGRADE")  # default: on for SQLite
    result = invoke("results", "studies")
    assert result.exit_code == 0 and "0 studies" in result.output


def test_database_newer_than_the_code_is_refused(env: Path) -> None:
    database = Database(f"sqlite:///{env / 'locus.db'}")
    database.upgrade()
    with database.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    database.dispose()
    result = invoke("results", "studies")
    assert result.exit_code == 1
    assert "9999_from_the_future, which this version of Locus does not know" in result.output


def test_unreachable_postgres_is_one_line(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LOCUS_DATABASE__URL", f"postgresql+psycopg://locus:{PASSWORD}@127.0.0.1:{port}/locus")
    result = invoke("results", "studies")
    assert result.exit_code == 1
    (line,) = error_lines(result.output)
    assert line.startswith(f"Error: cannot open database postgresql+psycopg://locus:***@127.0.0.1:{port}/locus")
    assert PASSWORD not in result.output


# ----------------------------------------------------------------- queries (items 7 and 8)


def test_query_never_creates_a_database(env: Path) -> None:
    for argv in (["results", "studies"], ["results", "lesions"], ["exports", "list"], ["review", "list"],
                 ["results", "similar", "1.2.3"]):
        result = invoke(*argv)
        assert result.exit_code == 1, result.output
        assert f"no results database at sqlite:///{env / 'locus.db'}" in result.output
    assert not (env / "locus.db").exists() and not env.exists()


@pytest.fixture
def analysed(env: Path) -> Path:
    """The data directory with one analysed study (test_db's STUDY, 2 lesions, 3 CT instances)."""
    database = Database(f"sqlite:///{env / 'locus.db'}")
    database.upgrade()
    vid = dbh.received_version(database)
    dbh.store(database, vid, "1.2.9.1")
    database.dispose()
    return env


@pytest.mark.parametrize("argv", [
    ["results", "show", "9.9.9"], ["results", "lesions", "9.9.9"], ["results", "similar", "9.9.9"],
    ["review", "list", "9.9.9"], ["review", "confirm", "9.9.9", "S1", "--by", "dr x"],
    ["review", "correct", "9.9.9", "S1", "liver", "--by", "dr x"], ["results", "show", "9.9.9", "--json"],
])
def test_unknown_study_is_an_error(analysed: Path, argv: list[str]) -> None:
    result = invoke(*argv)
    assert result.exit_code == 1, result.output
    assert "no such study" in result.output and "9.9.9" in result.output


def test_invalid_status_is_refused(analysed: Path) -> None:
    result = invoke("results", "studies", "--status", "done")
    assert result.exit_code == 2
    assert "'done' is not one of" in result.output
    result = invoke("results", "studies", "--status", "analysed", "--json")
    assert result.exit_code == 0 and [s["study_uid"] for s in json.loads(result.stdout)] == [dbh.STUDY]


def test_similar_without_embeddings_says_whether_an_encoder_is_configured(analysed: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke("results", "similar", dbh.STUDY)
    assert result.exit_code == 1
    assert "no stored embedding" in result.output and "no study encoder is configured" in result.output
    monkeypatch.setenv("LOCUS_MODELS__STUDY_ENCODER_CHECKPOINT", str(analysed / "hlip.pt"))
    result = invoke("results", "similar", dbh.STUDY)
    assert result.exit_code == 1
    assert "the configured study encoder (hlip.pt) has not embedded it" in result.output


def test_queries_name_the_database_and_json_stays_json(analysed: Path) -> None:
    url = f"sqlite:///{analysed / 'locus.db'}"
    for argv in (["results", "studies"], ["results", "lesions", dbh.STUDY], ["results", "show", dbh.STUDY],
                 ["exports", "list"], ["review", "list"]):
        result = invoke(*argv)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[0] == f"database: {url}", argv
    result = invoke("results", "lesions", dbh.STUDY, "--json")
    assert [r["lesion_id"] for r in json.loads(result.stdout)] == ["S1", "S2"]


# ----------------------------------------------------------------- tables (items 3 and 15)


def test_results_tables_at_80_and_200_columns(analysed: Path) -> None:
    narrow = invoke("results", "lesions", dbh.STUDY, env={"COLUMNS": "80"})
    assert narrow.exit_code == 0, narrow.output
    database_line, *table = narrow.stdout.splitlines()
    assert database_line.startswith("database: ") and max(len(line) for line in table) <= 80
    assert "SUVmax 12.50  SUVmean 7.25  SUVpeak 9.00 g/ml{SUVbw}" in narrow.stdout
    assert "volume 3.38 ml  TLG 24.47 g  CT mean 41.0 HU" in narrow.stdout
    assert "site: Liver" in narrow.stdout and "label: Lesion 1" in narrow.stdout
    assert "label: the sender's SEG segment label; site: the location the localizer" in narrow.stdout
    wide = invoke("results", "lesions", dbh.STUDY, env={"COLUMNS": "200"})
    assert "[g/ml{SUVbw}]" in wide.stdout and "[ml]" in wide.stdout and "[HU]" in wide.stdout
    assert "41.0" in wide.stdout and "Liver" in wide.stdout and "2 lesions" in wide.stdout
    assert max(len(line) for line in wide.stdout.splitlines()) <= 200


def test_one_study_is_singular_and_ct_slices_are_shown(analysed: Path) -> None:
    result = invoke("results", "studies", env={"COLUMNS": "200"})
    assert "1 study" in result.stdout and "1 studies" not in result.stdout
    result = invoke("results", "show", dbh.STUDY, env={"COLUMNS": "200"})
    (ct_row,) = [line for line in result.stdout.splitlines() if dbh.CT_SERIES in line]
    assert ct_row.split("│")[-2].strip() == "3" and "—" not in ct_row


# ----------------------------------------------------------------- demo (items 2, 7, 13)


def _store_demo_study(data: Path) -> str:
    """An analysed copy of the bundled demo study's UIDs in a data directory's database."""
    from node.cli_demo import SAMPLE_STUDY

    study_uid = str(dcmread(next(iter(sorted(SAMPLE_STUDY.rglob("*.dcm")))), stop_before_pixels=True).StudyInstanceUID)
    database = Database(f"sqlite:///{data / 'locus.db'}")
    database.upgrade()
    with database.session() as s:
        for i in range(3):
            repo.record_instance(s, dbh.rec(f"{dbh.CT_SERIES}.{i + 1}", study=study_uid), dbh.T0)
    with database.session() as s:
        (study_id,) = repo.pending_study_ids(s)
        snap = repo.lock_study(s, study_id)
        vid = repo.create_study_version(s, snap, rule="quiet_timer", reason="test", now=dbh.T0 + timedelta(minutes=2))
    result = dbh.analysis_result(3).to_json()
    result["study_instance_uid"] = study_uid
    with database.session() as s:
        assert repo.claim_analysis(s, vid, dbh.T0 + timedelta(minutes=3))
        repo.store_analysis_result(s, vid, result, result["lesions"],
                                   {"sr_sop_uid": "1.2.9.7", "series_uid": "1.2.9.7.0", "path": "x/1.2.9.7.dcm",
                                    "predecessor": None}, dbh.T0 + timedelta(minutes=4))
    database.dispose()
    return study_uid


def test_second_demo_shows_the_stored_results_without_waiting(env: Path) -> None:
    study_uid = _store_demo_study(env)
    result = invoke("demo", "--data-dir", str(env), "--timeout", "5", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"study {study_uid} was analysed before" in result.stderr and "--fresh" in result.stderr
    assert "sent " not in result.stderr  # nothing sent, nothing waited for
    assert "3 lesions" in result.stdout and "Liver" in result.stdout
    assert f"results show {study_uid}" in result.stderr
    assert result.stderr.splitlines()[0].startswith("Locus demo: about a minute in all")


def test_fresh_copy_has_new_uids_everywhere_and_is_valid(tmp_path: Path) -> None:
    from node.cli_demo import SAMPLE_STUDY, fresh_copy
    from tests.helpers.dicomcheck import assert_dciodvfy_clean

    files = sorted(SAMPLE_STUDY.rglob("*.dcm"))
    originals = [dcmread(p, stop_before_pixels=True) for p in files]
    old = {str(ds.get(k)) for ds in originals for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                                        "FrameOfReferenceUID") if ds.get(k)}
    copies, study_uid = fresh_copy(files, tmp_path)
    assert len(copies) == len(files) and study_uid not in old
    new_sops = set()
    for p in copies:
        ds = dcmread(p)
        assert ds.StudyInstanceUID == study_uid
        new_sops.add(str(ds.SOPInstanceUID))
        seen: list[str] = []
        ds.walk(lambda _d, e, seen=seen: seen.extend([str(v) for v in (e.value if e.VM > 1 else [e.value])])
                if e.VR == "UI" and e.value else None)
        assert not old & set(seen), p
    seg = [dcmread(p) for p in copies if dcmread(p, stop_before_pixels=True).Modality == "SEG"]
    assert seg, "the demo study has a SEG"
    referenced = {str(i.ReferencedSOPInstanceUID) for s in seg[0].ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence}
    assert referenced and referenced <= new_sops
    by_modality = {dcmread(p, stop_before_pixels=True).Modality: p for p in copies}
    for modality in ("CT", "PT", "SEG"):
        assert_dciodvfy_clean(by_modality[modality])


def test_demo_hint_names_the_script_that_works_in_this_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from node.cli_demo import locus_command

    script = tmp_path / ".venv" / "bin" / "locus"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script)])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert locus_command() == ".venv/bin/locus"
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    assert locus_command() == "locus"


# ----------------------------------------------------------------- echo (item 9)


def test_echo_to_an_unreachable_peer_is_one_line(env: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", "from node.cli import main; main()", "echo",
                           f"PACS@127.0.0.1:{port}", "--timeout", "5"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [f"C-ECHO PACS@127.0.0.1:{port} failed: cannot connect"]


# ----------------------------------------------------------------- serve's sweeper (item 1)


def test_sweeper_logs_a_repeated_error_once_with_its_traceback(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    import threading
    from types import SimpleNamespace

    from node import service

    calls = {"n": 0}
    node = SimpleNamespace(ctx=SimpleNamespace(settings=SimpleNamespace(
        completion=SimpleNamespace(sweep_interval_s=0.001))), stop_event=threading.Event())

    def failing_sweep(_ctx: object, ring_exports: bool) -> None:
        calls["n"] += 1
        if calls["n"] >= 30:
            node.stop_event.set()
        if calls["n"] <= 25:
            raise RuntimeError('relation "studies" does not exist')

    monkeypatch.setattr(service, "sweep_once", failing_sweep)
    monkeypatch.setattr(service, "SWEEP_REPEAT_REPORT_S", 1e9)
    with caplog.at_level("INFO", logger="node.service"):
        service._sweeper(node)  # type: ignore[arg-type]
    records = [r for r in caplog.records if r.name == "node.service"]
    assert [r.exc_info is not None for r in records] == [True, False]
    assert records[1].getMessage() == "sweep works again after 25 failed attempts (RuntimeError)"


def test_studies_and_show_at_80_columns_keep_uids_whole(analysed: Path) -> None:
    for argv in (["results", "studies"], ["results", "show", dbh.STUDY], ["review", "list"]):
        result = invoke(*argv, env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        _database, *lines = result.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80, result.stdout
        assert "…" not in result.stdout
    studies = invoke("results", "studies", env={"COLUMNS": "80"}).stdout
    assert dbh.STUDY in studies.splitlines() and "    Status analysed  Version 1  Series 1  Instances 3" in studies
    show = invoke("results", "show", dbh.STUDY, env={"COLUMNS": "80"}).stdout
    assert "quiet_timer" in show and "1.2.9.1" in show
