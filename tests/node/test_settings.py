"""LocusSettings: defaults under one data dir, environment variables, TOML, validation,
and the example configuration files documenting every setting."""

from __future__ import annotations

import os
import re
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dotenv import dotenv_values
from pydantic import BaseModel, ValidationError

from node.settings import ConfigFileError, LocusSettings

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_ENV = REPO / "deploy" / "config" / "locus.example.env"
EXAMPLE_TOML = REPO / "deploy" / "config" / "locus.example.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No LOCUS_* variables from the caller's environment; cwd in a temp dir."""
    for key in list(os.environ):
        if key.startswith("LOCUS_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def all_setting_keys() -> list[tuple[str, ...]]:
    """Every leaf setting as a path: ("log_level",), ("dicom", "port"), ..."""
    keys: list[tuple[str, ...]] = []
    for name, field in LocusSettings.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend((name, sub) for sub in ann.model_fields)
        else:
            keys.append((name,))
    return keys


def test_defaults_live_under_one_data_dir(tmp_path: Path) -> None:
    s = LocusSettings.load()
    data = tmp_path / "locus-data"
    assert s.data_dir == data and s.storage.data_dir.is_absolute()
    assert s.storage.spool_dir == data / "spool"
    assert s.storage.reports_dir == data / "reports"
    assert s.database.url == f"sqlite:///{data / 'locus.db'}"
    assert s.broker.url == f"sqla+sqlite:///{data / 'broker.db'}"
    assert "result_backend" not in type(s.broker).model_fields
    assert s.database.is_sqlite and s.database.should_auto_upgrade
    assert (s.dicom.ae_title, s.dicom.port, s.dicom.allowed_callers) == ("LOCUS", 11112, [])
    assert (s.completion.series_quiet_s, s.completion.study_quiet_s, s.completion.sweep_interval_s) == (5, 60, 1)
    assert s.analysis.lesion_mode == "segments"


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOCUS_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("LOCUS_DICOM__PORT", "11113")
    monkeypatch.setenv("LOCUS_DICOM__AE_TITLE", "NODE1")
    monkeypatch.setenv("LOCUS_DICOM__ALLOWED_CALLERS", '[{"ae_title": "PACS", "host": "10.0.0.5", "port": 104}]')
    monkeypatch.setenv("LOCUS_EXPORT__DESTINATIONS", '[{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}]')
    monkeypatch.setenv("LOCUS_COMPLETION__STUDY_QUIET_S", "120")
    monkeypatch.setenv("LOCUS_DATABASE__URL", "postgresql+psycopg://u@db/locus")
    monkeypatch.setenv("LOCUS_ANALYSIS__LESION_MODE", "components")
    s = LocusSettings.load()
    assert s.storage.spool_dir == tmp_path / "d" / "spool"
    assert s.broker.url == f"sqla+sqlite:///{tmp_path / 'd' / 'broker.db'}"
    assert (s.dicom.port, s.dicom.ae_title) == (11113, "NODE1")
    assert s.dicom.allowed_callers[0].host == "10.0.0.5" and s.dicom.allowed_callers[0].port == 104
    assert s.export.destination("pacs").port == 104
    assert s.completion.study_quiet_s == 120
    assert s.database.url == "postgresql+psycopg://u@db/locus" and not s.database.should_auto_upgrade
    assert s.analysis.lesion_mode == "components"

    # The explicit nested variable wins over the LOCUS_DATA_DIR alias.
    monkeypatch.setenv("LOCUS_STORAGE__DATA_DIR", str(tmp_path / "explicit"))
    assert LocusSettings.load().data_dir == tmp_path / "explicit"


def test_toml_file_and_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "locus.toml"
    config.write_text(
        f"""
log_level = "DEBUG"
[storage]
data_dir = "{tmp_path / "tomldata"}"
spool_dir = "incoming"
[dicom]
port = 4242
[[dicom.allowed_callers]]
ae_title = "MOD1"
[completion]
series_quiet_s = 2
"""
    )
    s = LocusSettings.load(config)
    assert s.log_level == "DEBUG" and s.dicom.port == 4242
    assert s.storage.spool_dir == tmp_path / "tomldata" / "incoming"
    assert s.database.url == f"sqlite:///{tmp_path / 'tomldata' / 'locus.db'}"
    assert s.dicom.allowed_callers[0].ae_title == "MOD1" and s.dicom.allowed_callers[0].host is None
    assert s.completion.series_quiet_s == 2

    # Via LOCUS_CONFIG, with an environment variable overriding the file.
    monkeypatch.setenv("LOCUS_CONFIG", str(config))
    monkeypatch.setenv("LOCUS_DICOM__PORT", "5000")
    s = LocusSettings.load()
    assert s.dicom.port == 5000 and s.log_level == "DEBUG"
    # Keyword arguments override both.
    assert LocusSettings.load(config, log_level="ERROR").log_level == "ERROR"


def test_configuration_errors_are_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="does not exist"):
        LocusSettings.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom\nport = 1")
    with pytest.raises(ConfigFileError, match="not valid TOML"):
        LocusSettings.load(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[dicom]\nprot = 104\n")
    with pytest.raises(ValidationError, match="prot"):
        LocusSettings.load(typo)
    with pytest.raises(ValidationError, match="AE title"):
        LocusSettings.load(dicom={"ae_title": "A_TITLE_LONGER_THAN_16"})
    with pytest.raises(ValidationError, match="AE title"):
        LocusSettings.load(dicom={"ae_title": "BAD\\AE"})
    with pytest.raises(ValidationError, match=r"study_quiet_s must be >= completion\.series_quiet_s"):
        LocusSettings.load(completion={"series_quiet_s": 100, "study_quiet_s": 60})
    with pytest.raises(ValidationError, match="names must be unique"):
        LocusSettings.load(
            export={
                "destinations": [
                    {"name": "a", "ae_title": "X", "host": "h", "port": 1},
                    {"name": "a", "ae_title": "Y", "host": "h", "port": 2},
                ]
            }
        )
    monkeypatch.setenv("LOCUS_DICOM__PROT", "104")  # a typo in an environment variable
    with pytest.raises(ValidationError, match="prot"):
        LocusSettings.load()


def test_export_backoff_is_bounded() -> None:
    export = LocusSettings.load(export={"max_attempts": 4, "backoff_base_s": 10, "backoff_cap_s": 25}).export
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert [export.retry_delay_s(n) for n in (1, 2, 3)] == [10, 20, 25]
    assert export.next_attempt_at(1, now) == now + timedelta(seconds=10)
    assert export.next_attempt_at(4, now) is None  # budget spent → failed


def test_disk_limits() -> None:
    storage = LocusSettings.load(storage={"disk_watermark_percent": 90, "min_free_bytes": 1000}).storage
    assert storage.disk_ok(total_bytes=100_000, free_bytes=50_000)
    assert not storage.disk_ok(total_bytes=100_000, free_bytes=5_000)  # 95 % used
    assert not storage.disk_ok(total_bytes=5_000, free_bytes=900)  # under min_free_bytes


def test_example_toml_is_valid_and_documents_every_setting() -> None:
    s = LocusSettings.load(EXAMPLE_TOML)
    assert s.database.url.startswith("postgresql+psycopg://") and s.broker.url.startswith("redis://")
    assert [c.ae_title for c in s.dicom.allowed_callers] == ["PACS", "PETCT01"]
    assert s.export.destinations[0].name == "pacs"
    assert s.models.resolve(s.models.localizer_checkpoint) == Path("/opt/locus/models/localizer.pth")
    text = EXAMPLE_TOML.read_text()
    data = tomllib.loads(text)
    missing = []
    for key in all_setting_keys():
        if len(key) == 1:
            present = key[0] in data
        else:
            section = data.get(key[0], {})
            # optional settings are shown commented out ("# name = ...")
            present = key[1] in section or f"# {key[1]} =" in text
        if not present:
            missing.append(".".join(key))
    assert missing == [], f"settings not documented in {EXAMPLE_TOML.name}: {missing}"


def test_example_env_is_valid_and_documents_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    text = EXAMPLE_ENV.read_text()
    names = {"_".join(["LOCUS", "__".join(k.upper() for k in key)]) for key in all_setting_keys()}
    documented = set(re.findall(r"^#? ?(LOCUS_[A-Z0-9_]+)=", text, flags=re.MULTILINE))
    assert sorted(names - documented) == [], "settings missing from locus.example.env"
    assert sorted(n for n in documented - names if n not in {"LOCUS_CONFIG", "LOCUS_DATA_DIR"}) == []
    active = {k: v for k, v in dotenv_values(EXAMPLE_ENV).items() if v is not None}
    assert active, "the example sets some values"
    for key, value in active.items():
        monkeypatch.setenv(key, value)
    s = LocusSettings.load()
    assert s.dicom.allowed_callers[0].port == 104
    assert s.export.destinations[0].ae_title == "PACS"
    assert s.storage.min_free_bytes == 10 * 1024**3


def test_listener_processes_auto_resolves_to_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from node.listener import processes
    from node.listener.server import ListenerConfig

    assert LocusSettings.load().dicom.listener_processes == 1  # embedded default: one process
    monkeypatch.setenv("LOCUS_DICOM__LISTENER_PROCESSES", "auto")
    auto = LocusSettings.load()
    assert auto.dicom.listener_processes == "auto"
    monkeypatch.setattr(processes, "usable_cpu_count", lambda: 3)
    assert ListenerConfig.from_settings(auto).processes == 3
    monkeypatch.setattr(processes, "usable_cpu_count", lambda: 48)
    assert ListenerConfig.from_settings(auto).processes == processes.AUTO_PROCESS_CAP
    monkeypatch.setenv("LOCUS_DICOM__LISTENER_PROCESSES", "4")
    assert ListenerConfig.from_settings(LocusSettings.load()).processes == 4
    for bad in ("0", "many", "65"):
        monkeypatch.setenv("LOCUS_DICOM__LISTENER_PROCESSES", bad)
        with pytest.raises(ValidationError, match="listener_processes"):
            LocusSettings.load()


def test_usable_cores_follow_affinity_and_cgroup_quota(tmp_path: Path) -> None:
    from node.listener.processes import cgroup_cpu_limit, usable_cpu_count

    root = tmp_path / "cgroup"
    service = root / "system.slice" / "locus-listener.service"
    service.mkdir(parents=True)
    proc_cgroup = tmp_path / "proc-self-cgroup"
    proc_cgroup.write_text("0::/system.slice/locus-listener.service\n")
    assert cgroup_cpu_limit(root, proc_cgroup) is None  # no cpu.max anywhere: no quota
    (service / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root, proc_cgroup) is None
    (service / "cpu.max").write_text("250000 100000\n")  # systemd CPUQuota=250%
    assert cgroup_cpu_limit(root, proc_cgroup) == 3  # rounded up to whole cores
    (root / "system.slice" / "cpu.max").write_text("150000 100000\n")  # a tighter parent wins
    assert cgroup_cpu_limit(root, proc_cgroup) == 2
    (root / "cpu.max").write_text("garbage\n")  # unreadable values are ignored
    assert cgroup_cpu_limit(root, proc_cgroup) == 2
    proc_cgroup.write_text("4:memory:/x\n1:cpu:/\n")  # cgroup v1 only: no v2 quota to read
    assert cgroup_cpu_limit(root, proc_cgroup) is None
    assert cgroup_cpu_limit(root, tmp_path / "absent") is None
    assert 1 <= usable_cpu_count() <= len(os.sched_getaffinity(0))


def test_retired_result_backend_is_ignored_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12, defect 7: ``broker.result_backend`` was never applied and is removed.

    An old config that still sets it (TOML or environment) keeps loading, with a WARNING
    naming the setting, and the Celery app still runs without a result backend.
    """
    from node.tasks.celery_app import configure_app

    cfg = tmp_path / "old.toml"
    cfg.write_text('[broker]\nurl = "redis://127.0.0.1:6379/0"\nresult_backend = "redis://127.0.0.1:6379/1"\n')
    with caplog.at_level("WARNING", logger="node.settings"):
        s = LocusSettings.load(cfg)
    assert s.broker.url == "redis://127.0.0.1:6379/0" and not hasattr(s.broker, "result_backend")
    assert any("broker.result_backend" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    caplog.clear()
    monkeypatch.setenv("LOCUS_BROKER__RESULT_BACKEND", "db+sqlite:///results.db")
    with caplog.at_level("WARNING", logger="node.settings"):
        LocusSettings.load()
    assert any("LOCUS_BROKER__RESULT_BACKEND" in r.getMessage() for r in caplog.records)
    app = configure_app(s.broker)
    assert app.conf.result_backend is None and app.conf.task_ignore_result is True
    caplog.clear()
    monkeypatch.delenv("LOCUS_BROKER__RESULT_BACKEND")
    with caplog.at_level("WARNING", logger="node.settings"):
        LocusSettings.load()
    assert not caplog.records  # a config without it says nothing
