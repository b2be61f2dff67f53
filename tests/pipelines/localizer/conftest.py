"""Session fixtures: small random HCL-AL checkpoints (plain and encrypted) and a vocabulary pair."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import factory as F

COARSE = {"crop_size": (32, 32, 48), "spacing": (4.0, 4.0, 6.0)}
FINE = {"crop_size": (32, 32, 32), "spacing": (3.0, 3.0, 3.0)}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hclal")
    F.write_checkpoint(root / "coarse" / "params.pth", F.make_state(seed=11, **COARSE))
    F.write_checkpoint(root / "fine" / "params.pth", F.make_state(seed=12, **FINE))
    F.write_checkpoint(root / "fine_enc" / "params.pth", F.make_state(seed=12, **FINE), encrypted=True)
    F.write_vocabulary(root)
    return root


@pytest.fixture(scope="session")
def vocab_paths(model_dir: Path) -> tuple[Path, Path]:
    return model_dir / "anatomy_vocabulary_library.json", model_dir / "augmented_location_descriptions.json"


@pytest.fixture(scope="session")
def localizers(model_dir: Path, vocab_paths: tuple[Path, Path]) -> dict:
    """One Localizer per geometry mode, loaded once (hcl-al mode reads the encrypted fine copy)."""
    from pipelines.models.localizer import Localizer

    fine = {"hcl-al": model_dir / "fine_enc" / "params.pth", "corrected": model_dir / "fine"}
    return {mode: Localizer.load(model_dir / "coarse", fine[mode], *vocab_paths, geometry_mode=mode) for mode in fine}
