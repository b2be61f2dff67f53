"""Models a worker uses, loaded once per process from local files (never downloaded).

``models.localizer_checkpoint`` names either

* a registry file (``*.json``, :class:`pipelines.models.registry.ModelRegistry`) whose
  entry ``models.localizer_id`` pins the coarse and fine checkpoints and the HCL-AL
  vocabulary/description pair by sha256, or
* a directory in HCL-AL's release layout: ``coarse/params.pth``, ``fine/params.pth``,
  ``anatomy_vocabulary_library.json``, ``augmented_location_descriptions.json``.

Unset means no localizer: reports then say that the location was not assessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import ModelError

if TYPE_CHECKING:
    from node.tasks.context import WorkerContext
    from pipelines.localization import LibraryLocalizer


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
