"""Models a worker uses, loaded once per process from local files (never downloaded).

``models.localizer_checkpoint`` names either

* a registry file (``*.json``, :class:`pipelines.models.registry.ModelRegistry`) whose
  entry ``models.localizer_id`` pins the coarse and fine checkpoints and the HCL-AL
  vocabulary/description pair by sha256, or
* a directory in HCL-AL's release layout: ``coarse/params.pth``, ``fine/params.pth``,
  ``anatomy_vocabulary_library.json``, ``augmented_location_descriptions.json``.

Unset means no localizer: reports then say that the location was not assessed.

``models.study_encoder_checkpoint`` names an HLIP checkpoint (hlip-compat.md §8) and
``models.study_encoder_text_dir`` the local BERT directory its text tower is built from;
unset checkpoint means no study embedding (the result carries no encoding, nothing is
flagged as failed).  Both are resolved against ``models.dir`` when relative.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import ModelError

if TYPE_CHECKING:
    from node.tasks.context import WorkerContext
    from pipelines.localization import LibraryLocalizer
    from node.settings import LocusSettings
    from pipelines.models.study_encoder.model import StudyEncoder, StudyEncoderConfig


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(path: Path, model_id: str | None, device: str) -> LibraryLocalizer:
    from pipelines.localization import LibraryLocalizer
    from pipelines.models.localizer.model import Localizer
    from pipelines.models.registry import ModelRegistry

    if path.suffix == ".json":
        registry = ModelRegistry.from_file(path)
        if model_id is None:
            raise ModelError(f"{path} is a model registry: set models.localizer_id", code="config_invalid")
        spec = registry.get(model_id)
        loc = Localizer.load(spec.coarse.path, spec.fine.path, spec.vocabulary.path, spec.descriptions.path,
                             device=device, model_id=model_id, expected=spec)
    elif path.is_dir():
        files = [path / "coarse" / "params.pth", path / "fine" / "params.pth",
                 path / "anatomy_vocabulary_library.json", path / "augmented_location_descriptions.json"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"localizer directory {path} lacks {', '.join(missing)}", code="model_missing")
        loc = Localizer.load(*files, device=device, model_id=model_id)
    else:
        raise ModelError(f"localizer checkpoint {path} does not exist", code="model_missing")
    return LibraryLocalizer(loc)


def load_localizer(ctx: WorkerContext) -> LibraryLocalizer | None:
    cfg = ctx.settings.models
    if cfg.localizer_checkpoint is None:
        return None
    path = Path(cfg.localizer_checkpoint)
    if not path.is_absolute() and cfg.dir is not None:
        path = Path(cfg.dir) / path
    key = f"localizer:{path}:{cfg.localizer_id}"
    return ctx.model(key, lambda: _load(path, cfg.localizer_id, _device(cfg.device)))  # type: ignore[no-any-return]


def study_encoder_config(settings: LocusSettings) -> StudyEncoderConfig | None:
    """The encoder configuration from ``models.study_encoder_*`` (None when no checkpoint is set)."""
    from pipelines.models.study_encoder.model import StudyEncoderConfig

    cfg = settings.models
    checkpoint = cfg.resolve(cfg.study_encoder_checkpoint)
    if checkpoint is None:
        return None
    text_dir = cfg.resolve(cfg.study_encoder_text_dir)
    if text_dir is None:
        raise ModelError("models.study_encoder_checkpoint is set but models.study_encoder_text_dir is not "
                         "(the BERT config and tokenizer directory the text tower is built from)",
                         code="config_invalid")  # fmt: skip
    return StudyEncoderConfig(
        checkpoint=checkpoint, text_dir=text_dir, model_name=cfg.study_encoder_model, model_id=cfg.study_encoder_id,
        prompt_set=cfg.study_encoder_prompt_set, thresholds=dict(sorted(cfg.study_encoder_thresholds.items())),
        expected_sha256=cfg.study_encoder_sha256, device=_device(cfg.device),
        max_chest_extent_mm=cfg.study_encoder_max_chest_extent_mm,
        config_dir=cfg.resolve(cfg.study_encoder_config_dir),
    )  # fmt: skip


def load_study_encoder(ctx: WorkerContext) -> StudyEncoder | None:
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

    return ctx.model(f"study_encoder:{config!r}", build)  # type: ignore[no-any-return]
