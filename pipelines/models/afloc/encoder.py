"""Worker-facing AFLoc API: load once (restricted reader, strict, hashed), then maps and scores.

Registration follows the other families: an :class:`AflocConfig` names the checkpoint and the
local text directory (``config.json`` + ``vocab.txt``; nothing downloaded); loading pins and
records the checkpoint sha256, the weights digest and the vocabulary sha256, and
:meth:`AflocEncoder.model_info` is the :class:`~pipelines.findings.ModelInfo` written into
results.  The reference re-encodes the image for every prompt (the upstream inference path); the image embeddings do
not depend on the prompt, so Locus encodes it once — the same numbers, 14× less work.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.prompts.afloc import AflocPromptSet, load_afloc_prompt_set
from pipelines.errors import ModelError
from pipelines.findings import ModelInfo
from pipelines.models.afloc import AFLOC_IMPLEMENTATION, AFLOC_NAME, maps, preprocess, zeroshot
from pipelines.models.afloc.checkpoint import AflocCheckpoint, load_strict, read_checkpoint, weights_digest
from pipelines.models.afloc.model import AflocModel, build_model
from pipelines.models.checkpoints import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AflocConfig:
    """What a deployment pins for one AFLoc model: files, expected hash, prompts and preprocessing, so a report can name them."""

    checkpoint: str | Path
    text_dir: str | Path
    model_id: str | None = None  # default "afloc-<first 12 hex of the checkpoint sha256>"
    expected_sha256: str = ""  # pin: refuse a checkpoint whose bytes changed
    prompt_set: str = "afloc_cxr_v1"
    preprocessing: str = preprocess.DICOM_TO_UINT8  # recorded in the manifest (``eval/utils.py:148-158``)


@dataclass(frozen=True)
class ImageEncoding:
    """One image's global and two local embeddings, kept so every phrase is scored without re-encoding the image."""

    global_emb: torch.Tensor  # [1, D]
    local: torch.Tensor  # [1, D, 19, 19]
    local2: torch.Tensor  # [1, D, 38, 38]


class AflocEncoder:
    """A loaded AFLoc model in eval mode on CPU (or ``device``)."""

    def __init__(self, config: AflocConfig, *, device: str = "cpu") -> None:
        self.config = config
        self.model, self.checkpoint = load_model(config.checkpoint, config.text_dir,
                                                 expected_sha256=config.expected_sha256)  # fmt: skip
        self.model.to(device)
        self.device = device
        self.weights_sha256 = weights_digest(self.checkpoint.state_dict)
        vocab = Path(config.text_dir) / "vocab.txt"
        self.vocab_sha256 = sha256_file(vocab) if vocab.is_file() else ""
        self.prompt_set: AflocPromptSet = load_afloc_prompt_set(config.prompt_set)
        self._report_cache: dict[str, torch.Tensor] = {}  # phrase -> report embedding (image-independent)
        log.info("AFLoc loaded: ckpt sha256=%s weights=%s vocab=%s adjustments=%s", self.checkpoint.sha256[:12],
                 self.weights_sha256[:12], self.vocab_sha256[:12], list(self.checkpoint.adjustments))  # fmt: skip

    @property
    def model_id(self) -> str:
        """The configured id, else one derived from the checkpoint hash, so a changed file never reuses an id."""
        return self.config.model_id or f"afloc-{self.checkpoint.sha256[:12]}"

    def manifest(self) -> dict[str, Any]:
        """Everything that determines the outputs (hashes, versions, adjustments, prompts), recorded with each result."""
        return {
            "model_id": self.model_id, "implementation": AFLOC_IMPLEMENTATION,
            "checkpoint_sha256": self.checkpoint.sha256, "weights_sha256": self.weights_sha256,
            "vocab_sha256": self.vocab_sha256, "lightning_version": self.checkpoint.lightning_version,
            "adjustments": list(self.checkpoint.adjustments), "preprocessing": self.config.preprocessing,
            "prompt_set": {"name": self.prompt_set.name, "version": self.prompt_set.version, "sha256": self.prompt_set.sha256},
        }  # fmt: skip

    def model_info(self) -> ModelInfo:
        """The model's identity for reports; the library hash covers vocabulary and prompt set, which also change scores."""
        library = hashlib.sha256(f"{self.vocab_sha256}\n{self.prompt_set.sha256}\n".encode()).hexdigest()
        return ModelInfo(model_id=self.model_id, name=AFLOC_NAME, version=AFLOC_IMPLEMENTATION,
                         sha256=self.checkpoint.sha256, library_hash=library)  # fmt: skip

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> ImageEncoding:
        """Embed one preprocessed ``[1,3,224,224]`` image once; maps and zero-shot scores reuse the result."""
        if tuple(x.shape) != (1, 3, preprocess.IMAGE_SIZE, preprocess.IMAGE_SIZE):
            raise ModelError(f"AFLoc input must be [1,3,224,224], got {tuple(x.shape)}", code="afloc_input_shape")
        g, local, local2 = self.model.encode_image(x.to(self.device))
        return ImageEncoding(g.cpu(), local.cpu(), local2.cpu())

    @torch.no_grad()
    def report_embeddings(self, phrases: list[str]) -> torch.Tensor:
        """``[N, D]`` report embeddings; computed once per phrase (they do not depend on the image).

        Batched and single-prompt encodings are identical upstream (``process_text``, ``afloc_model.py:243-330``), so caching and batching
        change no number.
        """
        todo = list(dict.fromkeys(p for p in phrases if p not in self._report_cache))
        if todo:
            reports = self.model.encode_text(todo).report.cpu()
            for p, r in zip(todo, reports):
                self._report_cache[p] = r
        return torch.stack([self._report_cache[p] for p in phrases])

    def localize(self, image: ImageEncoding, phrases: list[str], *, margin: bool = False) -> list[np.ndarray]:
        """One [−1, 1] map per phrase (the ``eval/common.py`` recipe; ``margin=True`` for the evaluation protocol)."""
        reports = self.report_embeddings(phrases)
        return [maps.localization_map(image.local, reports[i], margin=margin) for i in range(len(phrases))]

    def classify(self, image: ImageEncoding, *, rule: str = "cosine") -> list[zeroshot.ZeroShotScore]:
        """Paired-negation zero-shot scores for every finding of the prompt set (see :mod:`.zeroshot`)."""
        ps = self.prompt_set
        pos = self.report_embeddings([ps.positive(f) for f in ps.findings])
        neg = self.report_embeddings([ps.negative(f) for f in ps.findings])
        return zeroshot.paired_scores(image.global_emb, pos, neg, ps, rule=rule)


def load_model(checkpoint: str | Path, text_dir: str | Path, *,
               expected_sha256: str = "") -> tuple[AflocModel, AflocCheckpoint]:  # fmt: skip
    """Build the architecture offline and load ``checkpoint`` strictly (eval mode, CPU, fp32).

    The same entry point as the other families (``itemizedclip.model.load_model``).
    """
    ckpt = read_checkpoint(checkpoint, expected_sha256=expected_sha256)
    model = build_model(text_dir)
    load_strict(model, ckpt.state_dict)
    model.eval()
    log.info("AFLoc loaded: sha256=%s adjustments=%s", ckpt.sha256[:12], list(ckpt.adjustments))
    return model, ckpt
