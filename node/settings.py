"""The node's one typed settings object, built once at the entrypoint.

``LocusSettings`` is read from, in decreasing priority: keyword arguments, environment
variables (prefix ``LOCUS_``, nested sections joined with ``__``, e.g.
``LOCUS_DICOM__PORT=11112``; lists as JSON), an optional TOML file (``LOCUS_CONFIG`` or
the ``config`` argument of :meth:`LocusSettings.load`), and the defaults below.

Every embedded default lives under one data directory (``LOCUS_DATA_DIR``, default
``./locus-data``): the spool, the SQLite results database and the SQLite broker, so a
single-box install needs no other service.  Production swaps in PostgreSQL and Redis by
URL.  Everything is documented in ``deploy/config/locus.example.env`` and
``deploy/config/locus.example.toml``.

Library code never sees this object: the node passes plain values on (docs/design.md D3).
"""

from __future__ import annotations

import logging
import os
import re
from contextvars import ContextVar
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = [
    "AllowedCaller",
    "AnalysisSettings",
    "BrokerSettings",
    "CompletionSettings",
    "ConfigFileError",
    "DatabaseSettings",
    "DicomSettings",
    "ExportDestination",
    "ExportSettings",
    "LocusSettings",
    "ModelsSettings",
    "StorageSettings",
]

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("locus-data")

# PS3.5 §6.2: an AE title is a VR "AE" value, 1-16 characters of the default character
# repertoire without backslash or control characters; leading/trailing spaces are not
# significant and a title of only spaces is not allowed.
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")

_config_path: ContextVar[Path | None] = ContextVar("locus_config_path", default=None)


class ConfigFileError(ValueError):
    """The configuration file named by ``LOCUS_CONFIG`` or ``--config`` cannot be used."""


def _ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value):
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable ASCII characters, no backslash (PS3.5 §6.2)")
    return stripped


class _Section(BaseModel):
    # Unknown keys are typos in a config file: refuse them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllowedCaller(_Section):
    """A peer allowed to open associations (calling AE title, optionally pinned to a host)."""

    ae_title: str
    host: str | None = None  # IP address or host name the association must come from; None = any host
    port: int | None = Field(default=None, ge=1, le=65535)  # its own SCP port, used by return-to-sender

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, v: str) -> str:
        return _ae_title(v)


class DicomSettings(_Section):
    """The C-STORE SCP (listener).  Timeouts in seconds, as pynetdicom's AE attributes."""

    ae_title: str = "LOCUS"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    # Empty list = accept any calling AE (convenient for a demo on one box).  Production
    # configurations list every sender: an unknown caller is then rejected (permanent).
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    # Reject associations addressed to another AE title; false = answer to any called
    # title (a node reached under several titles through a router).
    require_called_ae_title: bool = True
    max_pdu: int = Field(default=0, ge=0)  # 0 = unlimited (PS3.8 §9.3.2.2, Annex D.1)
    max_associations: int = Field(default=8, ge=1)  # per listener process
    # Listener processes behind the port: pynetdicom is CPU-bound under the GIL, so
    # several parallel associations need several processes to use several cores. The
    # serving process hands every n-th connection to a child (round robin). 1 = the
    # serving process only (the embedded default: one process, quickest start);
    # "auto" = one per usable core, capped at 8 (node.listener.processes), for sites
    # with parallel senders.
    listener_processes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = 1
    # Wake association threads when data or a message arrives instead of pynetdicom's
    # 1 ms polling (node.listener.transport); false falls back to pynetdicom's loops.
    event_driven_associations: bool = True
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    # Offer the JPEG / JPEG-LS / JPEG 2000 / RLE transfer syntaxes as well as the
    # uncompressed ones; data is stored as received (mercure #25: senders that only
    # offer compressed syntaxes).
    accept_compressed: bool = True
    # Largest data set one C-STORE may carry; a larger one is refused with 0xA700 and
    # nothing is written (a runaway sender must not fill the spool with one object).
    # Generous: a whole-body enhanced multi-frame CT is well under 1 GiB.
    max_instance_bytes: int = Field(default=2 * 1024**3, ge=1)
    # A SOP Instance UID received again with *different* content (PS3.3 C.12.1.1.1: one
    # UID, one unchanging object, so this is a sender error): "keep_first" keeps the
    # indexed copy and drops the new bytes; "replace" stores the new copy, indexes it in
    # place of the first and makes a new study version. Either way: WARNING log with the
    # UIDs, a "duplicate" audit row, studies.duplicate_count + 1.
    duplicate_policy: Literal["keep_first", "replace"] = "keep_first"
    # DICOM TLS (PS3.15 Annex B.9, TLS 1.2/1.3; node.listener.tls). tls_port opens a
    # TLS port beside the plain one (served by the first listener process); it needs
    # the node's certificate and key (PEM). tls_client_ca set = mutual authentication:
    # a client must present a certificate issued by that CA (the AE allow-list still
    # applies). plain_port_enabled = false leaves only the TLS port.
    plain_port_enabled: bool = True
    tls_port: int | None = Field(default=None, ge=1, le=65535)
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_client_ca: Path | None = None

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, v: str) -> str:
        return _ae_title(v)

    @model_validator(mode="after")
    def _check_tls(self) -> DicomSettings:
        if self.tls_port is not None:
            if self.tls_certificate is None or self.tls_private_key is None:
                raise ValueError("dicom.tls_port needs dicom.tls_certificate and dicom.tls_private_key")
            if self.tls_port == self.port and self.plain_port_enabled:
                raise ValueError("dicom.tls_port must differ from dicom.port")
        elif not self.plain_port_enabled:
            raise ValueError("dicom.plain_port_enabled = false needs dicom.tls_port")
        return self


class StorageSettings(_Section):
    """Where received and produced files live, and when to stop accepting data."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    data_dir: Path = DEFAULT_DATA_DIR
    spool_dir: Path = None  # type: ignore[assignment]  # default <data_dir>/spool; relative = under data_dir
    reports_dir: Path = None  # type: ignore[assignment]  # default <data_dir>/reports; relative = under data_dir
    # Refuse new associations when the spool filesystem is fuller than this (MIG refuses
    # above 75 %, mercure cleans at 90 %; docs/design.md F7) or has less than min_free_bytes.
    disk_watermark_percent: float = Field(default=90.0, gt=0, le=100)
    min_free_bytes: int = Field(default=2 * 1024**3, ge=0)

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, v: Path) -> Path:
        # Absolute, so the listener, the workers and the CLI agree whatever their cwd.
        return v.expanduser().absolute()

    @field_validator("spool_dir", "reports_dir", mode="before")
    @classmethod
    def _under_data_dir(cls, v: Any, info: Any) -> Path:
        data_dir: Path = info.data.get("data_dir", DEFAULT_DATA_DIR.absolute())
        if v is None or v == "":
            return data_dir / ("spool" if info.field_name == "spool_dir" else "reports")
        p = Path(v).expanduser()
        return p if p.is_absolute() else data_dir / p

    def disk_ok(self, total_bytes: int, free_bytes: int) -> bool:
        """Whether a filesystem with these sizes is below both limits."""
        if total_bytes <= 0:
            return False
        used_percent = 100.0 * (total_bytes - free_bytes) / total_bytes
        return used_percent < self.disk_watermark_percent and free_bytes >= self.min_free_bytes


class DatabaseSettings(_Section):
    """The results database (SQLAlchemy URL)."""

    url: str  # default sqlite:///<data_dir>/locus.db, filled in by LocusSettings
    # Run Alembic "upgrade head" when a process opens the database.  None = only for
    # SQLite (the embedded default); a shared PostgreSQL is upgraded by `locus db upgrade`.
    auto_upgrade: bool | None = None
    echo: bool = False  # log SQL statements (debugging only: statements carry UIDs)
    sqlite_busy_timeout_ms: int = Field(default=30_000, ge=0)

    @property
    def is_sqlite(self) -> bool:
        """Whether the database is SQLite (single-host defaults differ from PostgreSQL's)."""
        return self.url.startswith("sqlite")

    @property
    def should_auto_upgrade(self) -> bool:
        """Whether processes migrate the schema on open: by default only SQLite's, which has no DBA."""
        return self.is_sqlite if self.auto_upgrade is None else self.auto_upgrade


class BrokerSettings(_Section):
    """The Celery broker.  Default: kombu's SQLAlchemy transport on SQLite (no service)."""

    url: str  # default sqla+sqlite:///<data_dir>/broker.db, filled in by LocusSettings
    # Redis: a task taken by a worker that then died (no acknowledgement) is handed to
    # another worker after this long. Recovery does not wait for it: the analysis lease
    # (analysis.lease_s) is reclaimed sooner; a late redelivery finds the lease held, or
    # the version done, and does nothing.
    visibility_timeout_s: float = Field(default=3600.0, gt=0)
    # Redis: prefix for every key kombu uses, so several nodes (or test runs) can share
    # one Redis database without seeing each other's queues. "" = kombu's own names.
    key_prefix: str = ""

    @model_validator(mode="before")
    @classmethod
    def _retired_result_backend(cls, data: Any) -> Any:
        """Drop the retired ``result_backend`` with a warning instead of refusing the config.

        It was never applied (the Celery app always ran without a result backend): task
        outcomes live in the results database, the only record the node, the CLI and the
        recovery sweeps read.  A config that still sets it ran without one before too, so
        it keeps starting, and the warning says to delete the line.
        """
        if isinstance(data, dict) and "result_backend" in data:
            data = dict(data)
            value = data.pop("result_backend")
            if value not in (None, ""):
                log.warning(
                    "setting broker.result_backend (LOCUS_BROKER__RESULT_BACKEND) is ignored and no longer "
                    "exists: Locus keeps task outcomes in the results database, not in a Celery result "
                    "backend; remove it from the configuration"
                )
        return data


class CompletionSettings(_Section):
    """When a study counts as complete (see :mod:`node.completion`).  All in seconds."""

    series_quiet_s: float = Field(default=5.0, ge=0)
    study_quiet_s: float = Field(default=60.0, ge=0)
    force_complete_s: float = Field(default=3600.0, gt=0)
    sweep_interval_s: float = Field(default=1.0, gt=0)
    # A version still `queued` (no worker claimed it) this long after it was enqueued is
    # enqueued again: its broker message may be lost (broker data deleted, Redis
    # flushed). A duplicate message is harmless: the task's claim is idempotent.
    requeue_stale_s: float = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> CompletionSettings:
        if self.study_quiet_s < self.series_quiet_s:
            raise ValueError("completion.study_quiet_s must be >= completion.series_quiet_s")
        if self.force_complete_s < self.study_quiet_s:
            raise ValueError("completion.force_complete_s must be >= completion.study_quiet_s")
        return self


class ExportDestination(_Section):
    """A DICOM peer that receives the reports (C-STORE SCP)."""

    name: str = Field(min_length=1, max_length=64)
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    # DICOM TLS to this peer (PS3.15 B.9, TLS 1.2/1.3): its certificate is verified
    # against tls_ca (default: the system trust store) and must name ``host``;
    # tls_certificate/tls_private_key are Locus's client certificate for peers that
    # require mutual authentication.
    tls: bool = False
    tls_ca: Path | None = None
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, v: str) -> str:
        return _ae_title(v)

    @model_validator(mode="after")
    def _check_tls(self) -> ExportDestination:
        if not self.tls and (self.tls_ca or self.tls_certificate or self.tls_private_key):
            raise ValueError(f"export destination {self.name!r}: tls_* files given but tls = false")
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError(f"export destination {self.name!r}: tls_certificate and tls_private_key go together")
        return self


class ExportSettings(_Section):
    """Where reports go and how failed sends are retried (bounded; docs/design.md F5, F6)."""

    destinations: list[ExportDestination] = Field(default_factory=list)
    # Also send each report back to the AE that sent the study, at the port listed for
    # that caller in dicom.allowed_callers (or a destination with the same AE title).
    return_to_sender: bool = False
    calling_ae_title: str = "LOCUS"  # our AE title when we are the SCU
    max_attempts: int = Field(default=5, ge=1)
    backoff_base_s: float = Field(default=30.0, gt=0)
    backoff_cap_s: float = Field(default=900.0, gt=0)
    timeout_s: float = Field(default=30.0, gt=0)  # association and DIMSE timeout per send

    @field_validator("calling_ae_title")
    @classmethod
    def _check_ae(cls, v: str) -> str:
        return _ae_title(v)

    @model_validator(mode="after")
    def _unique_names(self) -> ExportSettings:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError(f"export.destinations names must be unique, got {names}")
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("export.backoff_cap_s must be >= export.backoff_base_s")
        return self

    def destination(self, name: str) -> ExportDestination:
        """The destination named ``name``; KeyError naming it when none is configured."""
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(f"no export destination named {name!r}")

    def retry_delay_s(self, attempts_done: int) -> float:
        """Exponential backoff after ``attempts_done`` failed attempts (1 → base)."""
        return float(min(self.backoff_cap_s, self.backoff_base_s * 2 ** max(0, attempts_done - 1)))

    def next_attempt_at(self, attempts_done: int, now: datetime) -> datetime | None:
        """When to try again after ``attempts_done`` failures; None once the budget is spent."""
        if attempts_done >= self.max_attempts:
            return None
        return now + timedelta(seconds=self.retry_delay_s(attempts_done))


class ModelsSettings(_Section):
    """Model checkpoints.  None = that stage is skipped and the result says so."""

    dir: Path | None = None  # base directory for relative checkpoint paths
    localizer_id: str | None = None  # registry model_id of the HCL-AL-compatible localizer
    localizer_checkpoint: Path | None = None
    # HLIP-compatible study encoder (HLIP, arXiv 2505.21862): unset checkpoint = no study embedding.
    study_encoder_id: str | None = None  # model id recorded with embeddings; default "hlip-<visual weights hash[:12]>"
    study_encoder_checkpoint: Path | None = None  # .pt (training dict / state dict) or .safetensors
    study_encoder_sha256: str = ""  # pin: refuse a checkpoint whose sha256 differs ("" = record only)
    study_encoder_text_dir: Path | None = None  # local BERT dir (config.json + vocab.txt); None = embeddings only
    study_encoder_model: str = "vit_base_singlescan_h2_token2744"  # open_clip config name
    study_encoder_config_dir: Path | None = None  # extra open_clip model configs (site variants)
    study_encoder_prompt_set: str = "ct_rate_hlip_v1"  # library/prompts/<name>.json
    # Presence threshold per finding id, calibrated per site; a finding without one gets a
    # score only (no present/absent decision).  None are built in.
    study_encoder_thresholds: dict[str, float] = Field(default_factory=dict)
    study_encoder_max_chest_extent_mm: float = Field(default=400.0, gt=0)  # longer CTs: lung-centred crop
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # Verified on-disk cache of the localizer's candidate-text features (a warm start skips
    # encoding 327 texts); default <storage.data_dir>/cache/text-features; relative = under models.dir.
    text_cache_dir: Path | None = None

    def resolve(self, path: Path | None) -> Path | None:
        """A model path made absolute against the models directory (``~`` expanded); None stays None."""
        if path is None:
            return None
        path = path.expanduser()
        return path if path.is_absolute() or self.dir is None else self.dir.expanduser() / path


class AnalysisSettings(_Section):
    """How lesions are defined from a SEG, and how a worker holds a claimed analysis."""

    # "segments": one lesion per SEG segment; "components": each segment split into
    # connected components (autoPET-style single "tumor" segment; PS3.3 §C.8.20).
    lesion_mode: Literal["segments", "components"] = "segments"
    # Organisation UID root (PS3.5 §9.1, e.g. "1.2.826.0.1.3680043.10.999") for the SR
    # series and instance UIDs this node creates; None = "2.25." UUID-derived UIDs
    # (PS3.5 B.2). Instances received under this root are recognised as the node's own
    # (a PACS forwarding our SR back) and never make a new study version.
    uid_root: str | None = Field(default=None, max_length=40)

    @field_validator("uid_root")
    @classmethod
    def _check_root(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        root = v.strip().rstrip(".")
        if not re.fullmatch(r"[1-9][0-9]*(\.(0|[1-9][0-9]*))*", root):
            raise ValueError(f"analysis.uid_root {v!r} is not a UID root (digits and dots, no leading zeros)")
        return root
    # A worker holds a claimed analysis for lease_s and renews it every lease_renew_s while
    # it works; a lease left to expire (the worker died) is reclaimed by the sweeper and the
    # version enqueued again. The database, not the broker, guarantees the analysis ends.
    # Hosts' clocks (workers, sweeper) must agree to well within lease_s (NTP).
    lease_s: float = Field(default=300.0, gt=0)
    lease_renew_s: float = Field(default=60.0, gt=0)
    # Claims allowed per study version before an expired lease (or a transient error) ends
    # it `failed` with reason `attempts_exhausted`; `locus analyses requeue` grants a new round.
    max_attempts: int = Field(default=3, ge=1, le=100)

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> AnalysisSettings:
        if self.lease_renew_s * 2 > self.lease_s:
            raise ValueError("analysis.lease_renew_s must be at most half of analysis.lease_s")
        return self


class LocusSettings(BaseSettings):
    """Everything the node needs, from env vars, an optional TOML file and defaults."""

    model_config = SettingsConfigDict(
        env_prefix="LOCUS_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings
    broker: BrokerSettings
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)

    @classmethod
    def load(cls, config: str | Path | None = None, **overrides: Any) -> LocusSettings:
        """Build the settings, reading ``config`` (or ``$LOCUS_CONFIG``) as TOML if given.

        Raises :class:`ConfigFileError` when the named file does not exist or is not
        valid TOML, and pydantic's ``ValidationError`` for bad values.
        """
        token = _config_path.set(Path(config) if config is not None else None)
        try:
            return cls(**overrides)
        finally:
            _config_path.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Order the sources: init values, environment, ``$LOCUS_DATA_DIR``, then the TOML file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, _DataDirEnvSource(settings_cls)]
        path = _config_path.get()
        if path is None and os.environ.get("LOCUS_CONFIG"):
            path = Path(os.environ["LOCUS_CONFIG"])
        if path is not None:
            sources.append(_checked_toml_source(settings_cls, path))
        return tuple(sources)

    @model_validator(mode="before")
    @classmethod
    def _embedded_defaults(cls, data: Any) -> Any:
        """Fill the database and broker URLs that default to files under data_dir."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        storage = data.get("storage")
        if isinstance(storage, StorageSettings):
            data_dir = storage.data_dir
        else:
            raw = (storage or {}).get("data_dir") or DEFAULT_DATA_DIR
            data_dir = Path(raw).expanduser().absolute()
        for section, key, default in (
            ("database", "url", f"sqlite:///{data_dir / 'locus.db'}"),
            ("broker", "url", f"sqla+sqlite:///{data_dir / 'broker.db'}"),
        ):
            value = data.get(section)
            if value is None:
                data[section] = {key: default}
            elif isinstance(value, dict) and not value.get(key):
                data[section] = {**value, key: default}
        return data

    @property
    def data_dir(self) -> Path:
        """The node's data directory (spool, SQLite files), where relative paths resolve."""
        return self.storage.data_dir


class _DataDirEnvSource(PydanticBaseSettingsSource):
    """``LOCUS_DATA_DIR`` as a short alias of ``LOCUS_STORAGE__DATA_DIR``.

    Ranked after the environment proper, so the explicit nested variable wins, and
    before the TOML file, so an environment variable beats the file as everywhere else.
    """

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        value = os.environ.get("LOCUS_DATA_DIR")
        return {"storage": {"data_dir": value}} if value else {}


def _checked_toml_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    path = path.expanduser()
    if not path.is_file():
        raise ConfigFileError(f"configuration file {path} does not exist")
    try:
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigFileError(f"configuration file {path} is not valid TOML: {exc}") from exc
