"""A `locus worker` killed with SIGKILL mid-analysis: the analysis completes exactly once.

Production set-up on loopback: the node (listener, completion sweeper, in-process export
worker) with Redis as the broker (127.0.0.1:6379, as in CI), dcmtk ``storescu`` sending
the bundled PET/CT + SEG study, a dcmtk ``storescp`` as the report destination, and the
analysis left to separate ``locus worker --queues gpu`` processes.

The first worker runs with the test hook ``LOCUS_TEST_PAUSE_AFTER_CLAIM``
(node.tasks.testhooks): the real task claims the study version, then waits, and the test
kills the process with SIGKILL. The message was never acknowledged (``acks_late``), so
Redis hands it to the second worker once the visibility timeout (2 s here) has passed;
that worker's claim accepts the version still ``analysing`` (a redelivery) and finishes.

Expected: one analysis row (2 attempts), one report, one export, one SR at the PACS, and
an audit trail showing both starts and one completion.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from node.db.models import Analysis, AuditEvent, Export, Report, StudyVersion
from node.service import RunningNode, start_node
from node.settings import LocusSettings
from node.tasks.testhooks import PAUSE_AFTER_CLAIM_ENV
from tests.conftest import dcmtk, dcmtk_env, free_port
from tests.integration.test_node_end_to_end import study_files, wait_for

pytestmark = [pytest.mark.network, pytest.mark.slow]

REDIS_URL = os.environ.get("LOCUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
VISIBILITY_TIMEOUT_S = 2


def _require_redis() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # any failure to connect means "not available"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Redis is required in CI but unreachable at {REDIS_URL}: {exc}")
        pytest.skip(f"Redis unreachable at {REDIS_URL}: {exc}")


def _delete_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)


def _settings_values(data_dir: Path, port: int, pacs_port: int, prefix: str) -> dict[str, Any]:
    return {
        "storage": {"data_dir": str(data_dir)},
        "dicom": {"host": "127.0.0.1", "port": port},
        "broker": {"url": REDIS_URL, "key_prefix": prefix, "visibility_timeout_s": VISIBILITY_TIMEOUT_S},
        "completion": {"series_quiet_s": 0.5, "study_quiet_s": 30.0, "sweep_interval_s": 0.3},
        "export": {
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
            "backoff_base_s": 0.5,
            "backoff_cap_s": 2.0,
        },
    }


def _worker_env(values: dict[str, Any], **extra: str) -> dict[str, str]:
    """The same settings for a `locus worker` process, as LOCUS_* environment variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUS_")}
    for section, fields in values.items():
        for key, value in fields.items():
            name = f"LOCUS_{section.upper()}__{key.upper()}"
            env[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    env.update(extra)
    return env


@contextmanager
def _storescp(out_dir: Path, port: int) -> Iterator[Path]:
    out_dir.mkdir(parents=True)
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "PACS", "-od", str(out_dir), "+B", str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield out_dir
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def _worker(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "locus"), "worker", "--queues", "gpu"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _version_state(node: RunningNode) -> tuple[int, str] | None:
    """The newest study version's id and state."""
    with node.ctx.db.session(readonly=True) as s:
        row = s.execute(select(StudyVersion.id, StudyVersion.state).order_by(StudyVersion.id.desc())).first()
    return (int(row[0]), str(row[1])) if row is not None else None


def _instance_counts(node: RunningNode) -> list[int]:
    with node.ctx.db.session(readonly=True) as s:
        return list(s.scalars(select(StudyVersion.instance_count).order_by(StudyVersion.id)))


def _exports(node: RunningNode) -> list[tuple[str, int]]:
    with node.ctx.db.session(readonly=True) as s:
        return [(str(e.state), int(e.attempts)) for e in s.scalars(select(Export))]


def test_worker_killed_mid_analysis_completes_once(tmp_path: Path) -> None:
    _require_redis()
    port, pacs_port = free_port(), free_port()
    prefix = f"locus-test-{uuid.uuid4().hex[:12]}:"  # this test's own queues on the shared Redis
    values = _settings_values(tmp_path / "locus", port, pacs_port, prefix)
    settings = LocusSettings.load(None, **values)
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    logs = [tmp_path / "worker1.log", tmp_path / "worker2.log"]
    files = study_files()  # CT, PET, SEG: one send, one study version

    node = start_node(settings, analysis_worker=False)  # analyses go to the separate workers
    try:
        with _storescp(tmp_path / "pacs", pacs_port) as inbox:
            sent = subprocess.run(
                [dcmtk("storescu"), "-aet", "SENDER", "-aec", "LOCUS", "-R", "127.0.0.1", str(port),
                 *map(str, files)],
                env=dcmtk_env(), capture_output=True, text=True, timeout=120,
            )
            assert sent.returncode == 0, sent.stderr
            vid, _ = wait_for(
                lambda: (v := _version_state(node)) and v[1] == "queued" and v, 60, "a queued version", logs
            )
            assert _instance_counts(node) == [len(files)]  # one version holding the whole send

            # Worker 1 claims the version inside the real task and is killed there.
            with _worker(_worker_env(values, **{PAUSE_AFTER_CLAIM_ENV: str(hook_dir)}), logs[0]) as first:
                marker = wait_for(lambda: sorted(hook_dir.glob(f"claimed-{vid}-*")), 90, "the claim", logs)
                assert marker[0].name == f"claimed-{vid}-{first.pid}"
                assert _version_state(node) == (vid, "analysing")
                first.send_signal(signal.SIGKILL)
                assert first.wait(timeout=10) == -signal.SIGKILL

            # Worker 2 (no hook) gets the unacknowledged message again and finishes it.
            with _worker(_worker_env(values), logs[1]):
                wait_for(lambda: _exports(node) == [("done", 1)], 180, "the exported report", logs)
                received = wait_for(lambda: sorted(p for p in inbox.iterdir() if p.is_file()), 30, "the SR", logs)
                # Any further redelivery would show up now as a second analysis or export.
                time.sleep(VISIBILITY_TIMEOUT_S + 2)
                assert _exports(node) == [("done", 1)]

        with node.ctx.db.session(readonly=True) as s:
            analyses = [(a.attempts, a.status) for a in s.scalars(select(Analysis))]
            reports = list(s.scalars(select(Report.sr_sop_uid)))
            states = list(s.scalars(select(StudyVersion.state)))
            audit = [
                (str(a.kind), (a.detail or {}).get("attempt"))
                for a in s.scalars(select(AuditEvent).where(AuditEvent.kind != "received").order_by(AuditEvent.id))
            ]
    finally:
        node.stop()
        _delete_keys(prefix)

    assert analyses == [(2, "succeeded")]
    assert len(reports) == 1
    assert states == ["exported"]
    assert len(received) == 1
    sr = pydicom.dcmread(received[0])
    assert sr.SOPInstanceUID == reports[0]
    # Audit trail: both starts (attempt 1 killed, attempt 2 the redelivery), one result.
    assert [a for a in audit if a[0] == "started"] == [("started", 1), ("started", 2)]
    assert sum(1 for kind, _ in audit if kind == "analysed") == 1
    assert sum(1 for kind, _ in audit if kind == "exported") == 1
