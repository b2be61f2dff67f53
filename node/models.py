"""Models a worker uses, loaded once per process from local files (never downloaded).

``models.localizer_checkpoint`` names either

* a registry file (``*.json``, :class:`pipelines.models.registry.ModelRegistry`) whose
  entry ``models.localizer_id`` pins the coarse and fine checkpoints and the HCL-AL
  vocabulary/description pair by sha256, or
* a directory in HCL-AL's release layout: ``coarse/params.pth``, ``fine/params.pth``,
  ``anatomy_vocabulary_library.json``, ``augmented_location_descriptions.json``.

Unset means no localizer: reports then say that the location was not assessed.  The
localizer's candidate-text features are kept in a verified on-disk cache
(``models.text_cache_dir``, :mod:`pipelines.models.text_cache`), so a restart does not
re-encode them.

``models.study_encoder_checkpoint`` names an HLIP checkpoint (HLIP, arXiv 2505.21862) and
``models.study_encoder_text_dir`` the local BERT directory its text tower is built from;
unset checkpoint means no study embedding (the result carries no encoding, nothing is
flagged as failed).  Both are resolved against ``models.dir`` when relative.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipelines.errors import ModelError

if TYPE_CHECKING:
    from node.settings import LocusSettings
    from pipelines.localization import LibraryLocalizer
    from pipelines.models.study_encoder.model import StudyEncoder, StudyEncoderConfig

log = logging.getLogger(__name__)

#: Small localizer trained on phantom studies (``locus train demo-weights``), HCL-AL release layout.
SHIPPED_LOCALIZER_DIR = Path(__file__).resolve().parent / "demo_localizer"
_RELEASE_FILES = ("coarse/params.pth", "fine/params.pth", "anatomy_vocabulary_library.json",
                  "augmented_location_descriptions.json")


def shipped_localizer_dir() -> Path | None:
    """The shipped demo localizer when all four files are present, else None."""
    return SHIPPED_LOCALIZER_DIR if all((SHIPPED_LOCALIZER_DIR / f).is_file() for f in _RELEASE_FILES) else None


class ModelHost(Protocol):
    """What loading needs: the settings and a per-process model cache (a WorkerContext is one)."""

    settings: LocusSettings

    def model(self, key: str, loader: Any) -> Any:
        """The cached model for ``key``, built by ``loader()`` on first use."""


@dataclass
class ModelCache:
    """A :class:`ModelHost` without database or spool, for offline commands (``locus analyse``)."""

    settings: LocusSettings
    _models: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def model(self, key: str, loader: Any) -> Any:
        """The model for ``key``, loading it once per process (weights are large; loads are slow)."""
        with self._lock:
            if key not in self._models:
                self._models[key] = loader()
            return self._models[key]


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def text_cache_dir(settings: LocusSettings) -> Path:
    """``models.text_cache_dir`` (relative = under ``models.dir``), default ``<data_dir>/cache/text-features``."""
    cfg = settings.models
    configured = cfg.resolve(cfg.text_cache_dir)
    return configured if configured is not None else settings.storage.data_dir / "cache" / "text-features"


def _load(path: Path, model_id: str | None, device: str, cache_dir: Path | None = None,
          progress: Callable[[str], None] | None = None) -> LibraryLocalizer:  # fmt: skip
    from pipelines.localization import LibraryLocalizer
    from pipelines.models.localizer.model import Localizer
    from pipelines.models.registry import ModelRegistry
    from pipelines.models.text_cache import TextFeatureCache

    cache = TextFeatureCache(cache_dir) if cache_dir is not None else None

    if path.suffix == ".json":
        registry = ModelRegistry.from_file(path)
        if model_id is None:
            raise ModelError(f"{path} is a model registry: set models.localizer_id", code="config_invalid")
        spec = registry.get(model_id)
        loc = Localizer.load(spec.coarse.path, spec.fine.path, spec.vocabulary.path, spec.descriptions.path,
                             device=device, model_id=model_id, expected=spec, text_cache=cache, progress=progress)
    elif path.is_dir():
        files = [path / "coarse" / "params.pth", path / "fine" / "params.pth",
                 path / "anatomy_vocabulary_library.json", path / "augmented_location_descriptions.json"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"localizer directory {path} lacks {', '.join(missing)}", code="model_missing")
        loc = Localizer.load(*files, device=device, model_id=model_id, text_cache=cache, progress=progress)
    else:
        raise ModelError(f"localizer checkpoint {path} does not exist", code="model_missing")
    return LibraryLocalizer(loc)


def load_localizer(ctx: ModelHost, progress: Callable[[str], None] | None = None) -> LibraryLocalizer | None:
    """The configured localizer, loaded once per process (None when not configured)."""
    cfg = ctx.settings.models
    if cfg.localizer_checkpoint is None:
        return None
    path = Path(cfg.localizer_checkpoint)
    if not path.is_absolute() and cfg.dir is not None:
        path = Path(cfg.dir) / path
    cache_dir = text_cache_dir(ctx.settings)
    key = f"localizer:{path}:{cfg.localizer_id}"
    return ctx.model(key, lambda: _load(path, cfg.localizer_id, _device(cfg.device), cache_dir, progress))


def study_encoder_config(settings: LocusSettings) -> StudyEncoderConfig | None:
    """The encoder configuration from ``models.study_encoder_*`` (None when no checkpoint is set)."""
    from pipelines.models.study_encoder.model import StudyEncoderConfig

    cfg = settings.models
    checkpoint = cfg.resolve(cfg.study_encoder_checkpoint)
    if checkpoint is None:
        return None
    # No text directory: embeddings only (zero-shot findings need the text tower; the encoder flags that).
    text_dir = cfg.resolve(cfg.study_encoder_text_dir)
    return StudyEncoderConfig(
        checkpoint=checkpoint, text_dir=text_dir, model_name=cfg.study_encoder_model, model_id=cfg.study_encoder_id,
        prompt_set=cfg.study_encoder_prompt_set, thresholds=dict(sorted(cfg.study_encoder_thresholds.items())),
        expected_sha256=cfg.study_encoder_sha256, device=_device(cfg.device),
        max_chest_extent_mm=cfg.study_encoder_max_chest_extent_mm,
        config_dir=cfg.resolve(cfg.study_encoder_config_dir),
    )  # fmt: skip


def load_study_encoder(ctx: ModelHost) -> StudyEncoder | None:
    """The configured HLIP study encoder, built once per process (None when not configured).

    The cache key is the whole configuration (checkpoint, text directory, model config,
    prompt set, thresholds, device), so a process serving other settings (tests, in-process
    restarts) never reuses a stale encoder.
    """
    config = study_encoder_config(ctx.settings)
    if config is None:
        return None

    def build() -> StudyEncoder:
        from pipelines.models.study_encoder.model import StudyEncoder

        return StudyEncoder(config)

    return ctx.model(f"study_encoder:{config!r}", build)


def preload_models(ctx: ModelHost) -> list[str]:
    """Load every configured model now (worker start), so the first study does not wait for it.

    A model that fails to load is logged, not raised: the worker still starts, and the
    study that needs the model fails with the model's reason (the loader is retried then).
    Returns the model kinds that are ready.
    """
    ready = []
    for kind, loader in (("localizer", load_localizer), ("study encoder", load_study_encoder)):
        try:
            if loader(ctx) is not None:
                ready.append(kind)
        except Exception as exc:
            log.warning("%s not loaded at worker start: %s: %s", kind, type(exc).__name__, exc)
    if ready:
        log.info("models ready at worker start: %s", ", ".join(ready))
    return ready


def start_preload(ctx: ModelHost) -> threading.Thread:
    """:func:`preload_models` in a daemon thread: a start hook must return at once (Celery's
    ``worker_process_init`` is killed after a few seconds), and a task that arrives meanwhile
    waits on the model cache's lock instead of loading a second copy."""
    thread = threading.Thread(target=preload_models, args=(ctx,), name="model-preload", daemon=True)
    thread.start()
    return thread
