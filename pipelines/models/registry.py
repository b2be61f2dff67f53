"""Registry of model weights, pinned by hash, with the preprocessing they were trained with.

Every result Locus writes names the exact files that produced it (docs/design.md D5): a
:class:`LocalizerSpec` holds the path and SHA-256 of both HCL-AL checkpoints and of the
vocabulary/description JSON pair, the architecture names, the preprocessing read from each
checkpoint and Locus's implementation version.  :meth:`LocalizerSpec.model_info` condenses
that into the :class:`~pipelines.findings.ModelInfo` recorded in the SR and the database.

A deployment lists its models in a JSON manifest (``{"models": [spec, ...]}``); when a spec
carries hashes, loading verifies them and refuses a file that changed on disk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipelines.errors import ModelError
from pipelines.findings import ModelInfo
from pipelines.models.checkpoints import sha256_file

#: Version of Locus's HCL-AL re-implementation (bump when outputs can change).
LOCALIZER_IMPLEMENTATION = "locus-hclal-1.0"
LOCALIZER_NAME = "HCL-AL-compatible hierarchical CLIP lesion localizer"


@dataclass(frozen=True)
class PinnedFile:
    """A model file with the SHA-256 it must have."""
    path: str
    sha256: str = ""  # empty: not pinned (computed and recorded at load)

    def verify(self) -> PinnedFile:
        """Hash the file; raise if it differs from the pinned digest. Returns the pinned record."""
        p = Path(self.path)
        if not p.is_file():
            raise ModelError(f"registered file not found: {p}", code="model_file_missing")
        digest = sha256_file(p)
        if self.sha256 and digest != self.sha256:
            raise ModelError(
                f"{p.name} has sha256 {digest[:16]}…, registry pins {self.sha256[:16]}…", code="model_hash_mismatch"
            )
        return replace(self, sha256=digest)


@dataclass(frozen=True)
class LocalizerSpec:
    """One registered localizer: two checkpoints + the vocabulary pair they are used with."""

    model_id: str
    coarse: PinnedFile
    fine: PinnedFile
    vocabulary: PinnedFile
    descriptions: PinnedFile
    nets: tuple[str, str] = ("", "")
    preprocessing: dict[str, Any] = field(default_factory=dict)  # {"coarse": {...}, "fine": {...}}
    implementation: str = LOCALIZER_IMPLEMENTATION
    #: (coarse, fine) :func:`~pipelines.models.checkpoints.state_dict_sha256` of the loaded weights.
    weights_content: tuple[str, str] = ("", "")

    @property
    def weights_sha256(self) -> str:
        """One digest for the pair of networks (``ModelInfo.sha256``).

        From the weights content once loaded (plain and encrypted copies of one network give
        the same digest, so the same model id and Device Observer UID); from the file hashes
        for an entry that has not been loaded.
        """
        coarse, fine = self.weights_content if all(self.weights_content) else (self.coarse.sha256, self.fine.sha256)
        return hashlib.sha256(f"{coarse}\n{fine}\n".encode()).hexdigest()

    @property
    def library_sha256(self) -> str:
        """One hash of the vocabulary and descriptions, recorded in reports."""
        return hashlib.sha256(f"{self.vocabulary.sha256}\n{self.descriptions.sha256}\n".encode()).hexdigest()

    def model_info(self) -> ModelInfo:
        """The model as reports name it."""
        return ModelInfo(
            model_id=self.model_id,
            name=LOCALIZER_NAME,
            version=f"{self.implementation} ({self.nets[0]}/{self.nets[1]})",
            sha256=self.weights_sha256,
            library_hash=self.library_sha256,
        )

    def to_json(self) -> dict[str, Any]:
        """The spec as registry JSON."""
        return {
            "model_id": self.model_id,
            "coarse": {"path": self.coarse.path, "sha256": self.coarse.sha256},
            "fine": {"path": self.fine.path, "sha256": self.fine.sha256},
            "vocabulary": {"path": self.vocabulary.path, "sha256": self.vocabulary.sha256},
            "descriptions": {"path": self.descriptions.path, "sha256": self.descriptions.sha256},
            "nets": list(self.nets),
            "preprocessing": self.preprocessing,
            "implementation": self.implementation,
            **({"weights_content_sha256": list(self.weights_content)} if all(self.weights_content) else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], base_dir: Path | None = None) -> LocalizerSpec:
        """A spec from registry JSON, with relative paths resolved against ``base_dir``."""
        def pinned(key: str) -> PinnedFile:
            entry = data[key]
            path = Path(entry["path"])
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            return PinnedFile(str(path), str(entry.get("sha256", "")))

        try:
            return cls(
                model_id=str(data["model_id"]),
                coarse=pinned("coarse"),
                fine=pinned("fine"),
                vocabulary=pinned("vocabulary"),
                descriptions=pinned("descriptions"),
                nets=tuple(data.get("nets", ("", ""))),
                preprocessing=dict(data.get("preprocessing", {})),
                implementation=str(data.get("implementation", LOCALIZER_IMPLEMENTATION)),
                weights_content=tuple(data.get("weights_content_sha256", ("", ""))),
            )
        except (KeyError, TypeError) as exc:
            raise ModelError(f"malformed localizer registry entry: missing {exc}", code="registry_invalid") from exc


def default_model_id(coarse_sha256: str, fine_sha256: str) -> str:
    """``hclal-`` + 12 hex digits of the pair's digest; pass the weights-content hashes
    (:func:`~pipelines.models.checkpoints.state_dict_sha256`) so a re-saved or encrypted copy
    of the same networks keeps its id."""
    combined = hashlib.sha256(f"{coarse_sha256}\n{fine_sha256}\n".encode()).hexdigest()
    return f"hclal-{combined[:12]}"


class ModelRegistry:
    """In-memory registry keyed by ``model_id``, loadable from a JSON manifest."""

    def __init__(self, specs: Iterable[LocalizerSpec] = ()) -> None:
        self._specs: dict[str, LocalizerSpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: LocalizerSpec) -> None:
        """Add a spec; a second, different spec under the same id is refused."""
        if spec.model_id in self._specs and self._specs[spec.model_id] != spec:
            raise ModelError(f"model_id {spec.model_id!r} registered twice with different files", code="registry_invalid")
        self._specs[spec.model_id] = spec

    def get(self, model_id: str) -> LocalizerSpec:
        """The spec of ``model_id``; raises a model error naming the known ids."""
        try:
            return self._specs[model_id]
        except KeyError:
            raise ModelError(f"no model registered as {model_id!r}", code="model_unknown") from None

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelRegistry:
        """A registry from its JSON file; a bad file raises a model error."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"cannot read model registry {p}: {exc}", code="registry_invalid") from exc
        return cls(LocalizerSpec.from_json(entry, p.parent) for entry in data.get("models", []))

    def to_file(self, path: str | Path) -> None:
        """Write the registry as JSON."""
        Path(path).write_text(json.dumps({"models": [s.to_json() for s in self]}, indent=2), encoding="utf-8")
