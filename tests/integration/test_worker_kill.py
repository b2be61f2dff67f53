"""A `locus worker` killed with SIGKILL mid-analysis: the analysis completes exactly once,
within the lease plus a sweep, on each broker Locus supports.

Production set-up on loopback: the node (listener, completion sweeper, in-process export
worker), dcmtk ``storescu`` sending the bundled PET/CT + SEG study, a dcmtk ``storescp`` as
the report destination, and the analysis left to separate ``locus worker --queues gpu``
processes, with each broker: the embedded default (kombu's SQLAlchemy transport on SQLite,
which never returns a message fetched by a killed worker), Redis (127.0.0.1:6379, with a
visibility timeout of an hour, so the broker's redelivery cannot be what recovers) and
RabbitMQ (127.0.0.1:5672, which redelivers at once to a worker that then finds the lease
still held and skips it).

The first worker is started through ``python -m tests.helpers.paused_worker``, which adds a
pause after the claim (tests/helpers/pause_after_claim.py, set by ``LOCUS_TEST_PAUSE_AFTER_CLAIM``)
without any hook in the shipped code: the real task claims the study version, its heartbeat renews the
lease, and the test kills the process with SIGKILL. The renewals stop, the lease expires
after ``analysis.lease_s``, the sweeper reclaims it (audit ``lease_expired``) and enqueues
the version again; the second worker claims it (attempt 2) and finishes.

Expected: one analysis row (2 attempts), one report, one export, one SR at the PACS, and
an audit trail showing both starts, one lease expiry and one completion.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pydicom
import pytest
from sqlalchemy import select

from node.db.models import Analysis, AuditEvent, Export, Report, StudyVersion
from node.service import RunningNode, start_node
from node.settings import LocusSettings
from tests.conftest import dcmtk, dcmtk_env, free_port
from tests.helpers.pause_after_claim import PAUSE_AFTER_CLAIM_ENV
from tests.integration.test_node_end_to_end import study_files, wait_for

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.network, pytest.mark.slow]

REDIS_URL = os.environ.get("LOCUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("LOCUS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
# analysis.lease_s: how long a dead worker holds the version. Short, but longer than the
# GIL-heavy first imports (torch) of a fresh worker on a loaded 2-core CI machine, which
# can starve the heartbeat thread for several seconds (production: 300 s).
LEASE_S = 15.0
RENEW_S = 2.0
SWEEP_S = 0.3
SLACK_S = 15.0  # a loaded CI machine: process scheduling, SQLite locks


def _unavailable(what: str, exc: Exception) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is required in CI but unreachable: {exc}")
    pytest.skip(f"{what} unreachable: {exc}")


def _require_redis() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:  # any failure to connect means "not available"
        _unavailable(f"Redis at {REDIS_URL}", exc)


def _delete_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)


@contextmanager
def _rabbitmq() -> Iterator[str]:
    """A broker URL on RabbitMQ: a vhost of this test's own when ``rabbitmqctl`` can make
    one (no other run's messages), else the default vhost with the queues purged."""
    from kombu import Connection

    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.connect()
    except Exception as exc:  # any failure to connect means "not available"
        _unavailable(f"RabbitMQ at {AMQP_URL}", exc)
    vhost = f"locus-test-{uuid.uuid4().hex[:12]}"
    ctl = shutil.which("rabbitmqctl")
    made = ctl is not None and all(
        subprocess.run([ctl, *args], capture_output=True, timeout=60).returncode == 0
        for args in (["add_vhost", vhost], ["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"])
    )
    parts = urlsplit(AMQP_URL)
    url = urlunsplit((parts.scheme, parts.netloc, f"/{vhost}", "", "")) if made else AMQP_URL
    if not made:
        _purge(url)
    try:
        yield url
    finally:
        if made:
            subprocess.run([ctl, "delete_vhost", vhost], capture_output=True, timeout=60)  # type: ignore[list-item]
        else:
            _purge(url)


def _purge(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=3) as conn:
        for queue in ("gpu", "io"):
            try:
                conn.default_channel.queue_purge(queue)
            except Exception:
                conn.close()
                conn.connect()


@contextmanager
def _broker(kind: str) -> Iterator[dict[str, Any]]:
    """Broker settings for ``kind``; the embedded one is the default (no URL given)."""
    if kind == "embedded":
        yield {}
    elif kind == "redis":
        _require_redis()
        prefix = f"locus-test-{uuid.uuid4().hex[:12]}:"  # this test's own queues on the shared Redis
        try:
            # An hour: only the lease, not the broker's redelivery, can bring the analysis back in time.
            yield {"url": REDIS_URL, "key_prefix": prefix, "visibility_timeout_s": 3600}
        finally:
            _delete_keys(prefix)
    else:
        with _rabbitmq() as url:
            yield {"url": url}


def _settings_values(data_dir: Path, port: int, pacs_port: int, broker: dict[str, Any]) -> dict[str, Any]:
    return {
        "storage": {"data_dir": str(data_dir)},
        "dicom": {"host": "127.0.0.1", "port": port},
        **({"broker": broker} if broker else {}),
        "completion": {"series_quiet_s": 0.5, "study_quiet_s": 30.0, "sweep_interval_s": SWEEP_S},
        "analysis": {"lease_s": LEASE_S, "lease_renew_s": RENEW_S, "max_attempts": 3},
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
def _worker(env: dict[str, str], log: Path, *, paused: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    # paused: started through the test-only launcher that adds the pause after the claim
    command = ([sys.executable, "-m", "tests.helpers.paused_worker"] if paused
               else [str(Path(sys.executable).parent / "locus")])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "worker", "--queues", "gpu"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
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


def _lease_expired_at(node: RunningNode) -> Any:
    with node.ctx.db.session(readonly=True) as s:
        return s.scalar(select(AuditEvent.at).where(AuditEvent.kind == "lease_expired"))


@pytest.mark.parametrize("broker_kind", ["embedded", "redis", "rabbitmq"])
def test_worker_killed_mid_analysis_completes_once(tmp_path: Path, broker_kind: str) -> None:
    with _broker(broker_kind) as broker:
        _kill_and_recover(tmp_path, broker)


def _kill_and_recover(tmp_path: Path, broker: dict[str, Any]) -> None:
    import datetime as dt

    port, pacs_port = free_port(), free_port()
    values = _settings_values(tmp_path / "locus", port, pacs_port, broker)
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
            with _worker(_worker_env(values, **{PAUSE_AFTER_CLAIM_ENV: str(hook_dir)}), logs[0], paused=True) as first:
                marker = wait_for(lambda: sorted(hook_dir.glob(f"claimed-{vid}-*")), 90, "the claim", logs)
                assert marker[0].name == f"claimed-{vid}-{first.pid}"
                time.sleep(RENEW_S * 2)  # alive and renewing: the sweeper leaves the version alone
                assert _version_state(node) == (vid, "analysing") and _lease_expired_at(node) is None
                first.send_signal(signal.SIGKILL)
                killed_at = dt.datetime.now(dt.UTC)
                assert first.wait(timeout=10) == -signal.SIGKILL

            # Worker 2 (no hook) gets the version once the sweeper reclaimed the dead worker's lease.
            with _worker(_worker_env(values), logs[1]):
                expired_at = wait_for(lambda: _lease_expired_at(node), LEASE_S + SWEEP_S + SLACK_S,
                                      "the lease to expire and be reclaimed", logs)  # fmt: skip
                # Within the lease plus a sweep (the last renewal was before the kill).
                assert (expired_at - killed_at).total_seconds() <= LEASE_S + SWEEP_S + SLACK_S
                wait_for(lambda: _exports(node) == [("done", 1)], 180, "the exported report", logs)
                received = wait_for(lambda: sorted(p for p in inbox.iterdir() if p.is_file()), 30, "the SR", logs)
                # Any further redelivery or reclaim would show up now as a second analysis or export.
                time.sleep(LEASE_S + 2)
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

    assert analyses == [(2, "succeeded")]
    assert len(reports) == 1
    assert states == ["exported"]
    assert len(received) == 1
    sr = pydicom.dcmread(received[0])
    assert sr.SOPInstanceUID == reports[0]
    # Audit trail: attempt 1 killed, its lease reclaimed once, attempt 2 finished; one result.
    assert [a for a in audit if a[0] in ("started", "lease_expired")] == [
        ("started", 1), ("lease_expired", 1), ("started", 2)]  # fmt: skip
    assert sum(1 for kind, _ in audit if kind == "analysed") == 1
    assert sum(1 for kind, _ in audit if kind == "exported") == 1
