"""The HCL-AL-compatible hierarchical localizer: load once, localize lesions in batches.

Per model load (HCL-AL, Gao et al. 2025):

1. read both checkpoints (plain or "uAI_model"), build the networks named by ``net`` and
   load them strictly on CPU, then move them to the requested device;
2. tokenize and encode every coarse description with the coarse checkpoint's text tower
   and every fine description with the fine checkpoint's tower, once, and keep the
   L2-normalised embeddings (the reference rebuilds the tokenizer and re-encodes up to
   181 texts per lesion: bug B14).

Per batch of lesions: coarse crops → one image-encoder forward → ``softmax(100·cos)`` over
all coarse keys → reference coarse ranking → fine crops → one forward → softmax over each
lesion's own fine candidates → reference fine decision (:mod:`.hierarchy`).

Geometry modes (``geometry_mode``):

``hcl-al``
    reproduces the reference preprocessing bit for bit: boxes from ``calc_lesion_bbox``
    (+½-voxel centre bias B1, wrong centre for flipped axes B2), float32 crop centre, mask
    channel by connected components + IoU with the reference fallback and its defects
    (B5–B8).  Use it to validate against published weights and outputs.
``corrected`` (default)
    exact voxel-edge boxes, the lesion's own binary mask in both stages, a proper dilation
    in the tiny-lesion fallback and an empty channel (flagged) when the lesion is absent.
    The −½-voxel crop origin (B3) and 0 padding outside the scan (B4) are training
    conventions and are kept; the fraction of the crop outside the scan is reported.

Scores are the reference ``softmax(100·cos)`` values.  They are not calibrated; a
calibrated probability is reported only when temperatures fitted on site data are given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from pipelines.dicom.volume import Volume
from pipelines.errors import GeometryError, InputError, ModelError
from pipelines.findings import Flag, Localization, ModelInfo, RankedLabel, SiteAssignment
from pipelines.models.checkpoints import (
    UAI_DEFAULT_KEY,
    HclalCheckpoint,
    Preprocessing,
    is_encrypted,
    load_checkpoint,
)
from pipelines.models.localizer import hierarchy
from pipelines.models.localizer.crop import (
    CropGeometry,
    as_float32,
    crop_around,
    crop_origin,
    normalize,
    outside_fraction,
    to_xyz,
)
from pipelines.models.localizer.lesion_mask import (
    LesionBox,
    MaskChannel,
    corrected_mask_channel,
    exact_box_from_bounds,
    reference_box_from_bounds,
    reference_mask_channel,
)
from pipelines.models.localizer.network import HclalClipNet, build_network
from pipelines.models.localizer.vocabulary import Vocabulary
from pipelines.models.registry import LocalizerSpec, PinnedFile, default_model_id
from pipelines.models.text import ClipTokenizer, encode_texts
from pipelines.models.text_cache import TextFeatureCache, checkpoint_tower_hash

log = logging.getLogger(__name__)

GEOMETRY_MODES = ("corrected", "hcl-al")


@dataclass
class LesionQuery:
    """One lesion to localize, on the image level.

    ``box`` gives the crop centre, the IoU query (hcl-al mode) and the >100 mm rule.
    ``mask`` is a label image on its own grid.  In corrected mode the lesion is
    ``mask == label`` (any nonzero voxel when ``label`` is None); hcl-al mode ignores
    ``label`` and finds the lesion as HCL-AL does (CC + IoU, or ``target_label`` in the
    coarse stage of the reference mask mode).
    """

    box: LesionBox
    mask: sitk.Image
    label: float | None = None
    target_label: int = 0


@dataclass(frozen=True)
class LocalizerOutput:
    """Everything the localizer says about one lesion (strings; coding is the library's job)."""

    final_label: str
    coarse_ranking: tuple[RankedLabel, ...]  # kept coarse keys (zero-dropped, top-k), reference probabilities
    fine_ranking: tuple[RankedLabel, ...]  # fine words, sorted, zero-dropped
    fine_to_coarse: tuple[str, ...]  # coarse key each fine word was resolved under
    alternatives: tuple[RankedLabel, ...]  # up to 3 distinct final strings with their scores
    box: LesionBox
    large_lesion: bool
    mask_fallback: bool
    mask_missing: bool
    outside_fraction: float  # of the coarse crop, outside the CT or SUV field of view
    geometry_mode: str
    model: ModelInfo
    calibrated_probability: float | None = None
    flags: tuple[Flag, ...] = ()

    def hclal_columns(self) -> dict[str, str]:
        """The output columns of HCL-AL's ``*_pred.csv`` (values formatted like the reference)."""
        return {
            "coarse_labels": ",".join(r.label for r in self.coarse_ranking),
            "coarse_probs": ",".join(str(r.score) for r in self.coarse_ranking),
            "fine_to_coarse_labels": ",".join(self.fine_to_coarse),
            "fine_labels": ",".join(r.label for r in self.fine_ranking),
            "fine_probs": ",".join(str(r.score) for r in self.fine_ranking),
            "pred": self.final_label,
        }

    def to_localization(self, site: SiteAssignment | None = None) -> Localization:
        """The output as the pipeline's Localization, with the library site when one was assigned."""
        return Localization(
            site=site,
            final_label=self.final_label,
            coarse_ranking=self.coarse_ranking,
            fine_ranking=self.fine_ranking,
            alternatives=self.alternatives,
            model=self.model,
            geometry_mode=self.geometry_mode,
            calibrated_probability=self.calibrated_probability,
            flags=self.flags,
        )


@dataclass(frozen=True)
class Decision:
    """Every intermediate of one hierarchical decision, for explanations and tests."""
    coarse: hierarchy.CoarseResult
    candidates: hierarchy.FineCandidates
    fine: hierarchy.FineResult
    calibrated: float | None


@dataclass
class Stage:
    """One loaded checkpoint with its cached candidate-text embeddings."""

    name: str  # "coarse" | "fine"
    checkpoint_path: str
    sha256: str
    encrypted: bool
    net_name: str
    pre: Preprocessing
    net: HclalClipNet
    words: tuple[str, ...]
    text_emb: torch.Tensor  # [N, D], L2-normalised, on device
    word_index: dict[str, int] = field(default_factory=dict)

    @property
    def geometry(self) -> CropGeometry:
        """The crop geometry this stage's network was trained with."""
        return CropGeometry(self.pre.spacing, self.pre.crop_size)


def _check_channels(pre: Preprocessing, stage: str) -> None:
    if pre.input_channel != 3 or pre.lesion_idx != (2,):
        raise ModelError(
            f"{stage} checkpoint expects {pre.input_channel} channels with lesion_idx {pre.lesion_idx}; "
            "Locus feeds exactly [CT, SUV, lesion mask]",
            code="checkpoint_channels_unsupported",
        )


def _build_stage(
    name: str, ckpt: HclalCheckpoint, words: Sequence[str], vocab: Vocabulary, device: torch.device, channels_last: bool,
    text_cache: TextFeatureCache | None = None, progress: Callable[[str], None] | None = None,
) -> Stage:
    _check_channels(ckpt.preprocessing, name)
    net = build_network(ckpt, share_weights=True).to(device)  # inference only: no copy of the weights
    if channels_last:
        net.image_encoder.to(memory_format=torch.channels_last_3d)
    context = net.context_length
    tokens = ClipTokenizer(context).tokenize([vocab.text(w) for w in words])
    if text_cache is None:
        emb = encode_texts(net.text_encoder, tokens, post=net.text_fc)
    else:  # same bytes as encode_texts on this device type, verified on load (.text_cache)
        # The checkpoint's content hash (computed once when it was read) names the tower's
        # weights; without one (an in-memory checkpoint) the tower's tensors are hashed.
        tower_hash = checkpoint_tower_hash(ckpt.content_sha256) if ckpt.content_sha256 else None
        emb = text_cache.features(net.text_encoder, tokens, post=net.text_fc, tower_hash=tower_hash,
                                  what=f"{len(words)} {name} descriptions", progress=progress)
    return Stage(
        name=name,
        checkpoint_path=ckpt.path,
        sha256=ckpt.sha256,
        encrypted=ckpt.encrypted,
        net_name=ckpt.net,
        pre=ckpt.preprocessing,
        net=net,
        words=tuple(words),
        text_emb=emb,
        word_index={w: i for i, w in enumerate(words)},
    )


def fitted_temperatures(coarse: HclalCheckpoint, fine: HclalCheckpoint) -> tuple[float, float] | None:
    """(coarse T, fine T) fitted by ``locus train calibrate`` and stored in both checkpoints' ``locus`` metadata.

    None unless *both* stages carry a positive fitted temperature: a probability is only
    called calibrated when it was calibrated.
    """
    temps = []
    for ckpt in (coarse, fine):
        meta = ckpt.extra.get("locus")
        cal = meta.get("calibration") if isinstance(meta, dict) else None
        t = cal.get("temperature") if isinstance(cal, dict) else None
        if not isinstance(t, (int, float)) or not t > 0:
            return None
        temps.append(float(t))
    return temps[0], temps[1]


def _is_encrypted_file(path: str | Path) -> bool:
    """Whether a checkpoint file (or its folder's ``params.pth``) carries the uAI_model tag."""
    p = Path(path)
    p = p / "params.pth" if p.is_dir() else p
    try:
        with open(p, "rb") as fh:
            return is_encrypted(fh.read(16))
    except OSError:
        return False  # load_checkpoint reports the missing file


def _checked_options(geometry_mode: str, device: str | torch.device) -> torch.device:
    """Validate the run-time options shared by :meth:`Localizer.load` and ``from_checkpoints``."""
    if geometry_mode not in GEOMETRY_MODES:
        raise ModelError(f"unknown geometry mode {geometry_mode!r}; use one of {GEOMETRY_MODES}", code="config_invalid")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but no CUDA device is available", code="device_unavailable")
    return dev


class Localizer:
    """Load with :meth:`load`; call :meth:`localize` (Volumes) or :meth:`localize_images` (SimpleITK)."""

    def __init__(
        self,
        coarse: Stage,
        fine: Stage,
        vocab: Vocabulary,
        spec: LocalizerSpec,
        *,
        device: torch.device,
        geometry_mode: str = "corrected",
        coarse_topk: int | None = 3,
        fuse_coarse_threshold: float = 0.0,
        temperatures: tuple[float, float] | None = None,
        batch_size: int = 8,
    ) -> None:
        if geometry_mode not in GEOMETRY_MODES:
            raise ValueError(f"geometry_mode must be one of {GEOMETRY_MODES}")
        if temperatures is not None and min(temperatures) <= 0:
            raise ValueError("temperatures must be positive")
        self.coarse = coarse
        self.fine = fine
        self.vocab = vocab
        self.spec = spec
        self.device = device
        self.geometry_mode = geometry_mode
        self.coarse_topk = coarse_topk
        self.fuse_coarse_threshold = fuse_coarse_threshold
        self.temperatures = temperatures
        self.batch_size = max(1, int(batch_size))
        self.model_info = spec.model_info()
        self.channels_last = device.type == "cpu" and geometry_mode == "corrected"

    @property
    def compat(self) -> bool:
        """Whether the published HCL-AL geometry quirks are reproduced (``hcl-al`` mode)."""
        return self.geometry_mode == "hcl-al"

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        coarse_path: str | Path,
        fine_path: str | Path,
        vocabulary_json: str | Path,
        descriptions_json: str | Path,
        *,
        device: str | torch.device = "cpu",
        geometry_mode: str = "corrected",
        coarse_topk: int | None = 3,
        fuse_coarse_threshold: float = 0.0,
        temperatures: tuple[float, float] | None = None,
        batch_size: int | None = None,
        model_id: str | None = None,
        expected: LocalizerSpec | None = None,
        key: bytes = UAI_DEFAULT_KEY,
        text_cache: TextFeatureCache | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Localizer:
        """Load both stages and cache the text embeddings.

        ``expected`` (a registry entry) pins the four files' hashes; a mismatch is a
        :class:`ModelError`.  ``temperatures`` = (coarse T, fine T) fitted on site data
        enables ``calibrated_probability``; when not given, temperatures fitted by
        ``locus train calibrate`` and stored in both checkpoints are used
        (:func:`fitted_temperatures`); without either no calibration is claimed.
        ``text_cache`` keeps the candidate-text features on disk (a warm start skips encoding
        them); ``progress`` is told, in words, about slow one-time steps (decrypting, encoding).
        """
        dev = _checked_options(geometry_mode, device)  # before reading ~0.75 GB of checkpoints
        vocab = Vocabulary.load(vocabulary_json, descriptions_json)
        for what, path in (("coarse", coarse_path), ("fine", fine_path)):
            if progress is not None and _is_encrypted_file(path):
                progress(f"decrypting the {what} checkpoint (uAI_model obfuscation; takes a while for full-size weights)")
        coarse_ckpt = load_checkpoint(coarse_path, key=key)
        fine_ckpt = load_checkpoint(fine_path, key=key)
        return cls.from_checkpoints(
            coarse_ckpt, fine_ckpt, vocab, vocabulary_path=str(vocabulary_json),
            descriptions_path=str(descriptions_json), device=dev, geometry_mode=geometry_mode,
            coarse_topk=coarse_topk, fuse_coarse_threshold=fuse_coarse_threshold, temperatures=temperatures,
            batch_size=batch_size, model_id=model_id, expected=expected, text_cache=text_cache, progress=progress,
        )  # fmt: skip

    @classmethod
    def from_checkpoints(
        cls,
        coarse_ckpt: HclalCheckpoint,
        fine_ckpt: HclalCheckpoint,
        vocab: Vocabulary,
        *,
        vocabulary_path: str = "",
        descriptions_path: str = "",
        device: str | torch.device = "cpu",
        geometry_mode: str = "corrected",
        coarse_topk: int | None = 3,
        fuse_coarse_threshold: float = 0.0,
        temperatures: tuple[float, float] | None = None,
        batch_size: int | None = None,
        model_id: str | None = None,
        expected: LocalizerSpec | None = None,
        text_cache: TextFeatureCache | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Localizer:
        """Build from already-read checkpoints (what :meth:`load` does after reading files)."""
        dev = _checked_options(geometry_mode, device)
        if temperatures is None:
            temperatures = fitted_temperatures(coarse_ckpt, fine_ckpt)
        spec = LocalizerSpec(
            model_id=model_id or (expected.model_id if expected else default_model_id(
                coarse_ckpt.content_sha256 or coarse_ckpt.sha256, fine_ckpt.content_sha256 or fine_ckpt.sha256)),
            coarse=PinnedFile(coarse_ckpt.path, coarse_ckpt.sha256),
            fine=PinnedFile(fine_ckpt.path, fine_ckpt.sha256),
            vocabulary=PinnedFile(vocabulary_path, vocab.vocabulary_sha256),
            descriptions=PinnedFile(descriptions_path, vocab.descriptions_sha256),
            nets=(coarse_ckpt.net, fine_ckpt.net),
            preprocessing={"coarse": coarse_ckpt.preprocessing.to_json(), "fine": fine_ckpt.preprocessing.to_json()},
            weights_content=(coarse_ckpt.content_sha256, fine_ckpt.content_sha256),
        )
        if expected is not None:
            for what in ("coarse", "fine", "vocabulary", "descriptions"):
                pinned: PinnedFile = getattr(expected, what)
                actual: PinnedFile = getattr(spec, what)
                if pinned.sha256 and pinned.sha256 != actual.sha256:
                    raise ModelError(
                        f"{what} file {Path(actual.path).name} has sha256 {actual.sha256[:16]}…, "
                        f"registry entry {expected.model_id!r} pins {pinned.sha256[:16]}…",
                        code="model_hash_mismatch",
                    )
        # oneDNN's 3-D convolutions run ~1.8x faster channels-last on CPU, but sum in another order
        # (embeddings differ by ~1e-5 relative); hcl-al mode keeps the reference's contiguous layout.
        channels_last = dev.type == "cpu" and geometry_mode == "corrected"
        coarse = _build_stage("coarse", coarse_ckpt, vocab.coarse_keys, vocab, dev, channels_last, text_cache, progress)
        fine = _build_stage("fine", fine_ckpt, vocab.fine_words, vocab, dev, channels_last, text_cache, progress)
        if not vocab.matches_published_counts():
            # Expected for weights Locus trained on its own vocabulary (they carry a "locus"
            # metadata key); worth a warning only for weights that claim to be HCL-AL's.
            own = "locus" in coarse_ckpt.extra and "locus" in fine_ckpt.extra
            log.log(logging.INFO if own else logging.WARNING,
                    "HCL-AL vocabulary counts %s differ from the published pair%s", vocab.counts(),
                    " (Locus-trained weights with their own vocabulary)" if own else "")
        log.info("localizer %s ready on %s (%s mode)", spec.model_id, dev, geometry_mode)
        return cls(
            coarse, fine, vocab, spec, device=dev, geometry_mode=geometry_mode, coarse_topk=coarse_topk,
            fuse_coarse_threshold=fuse_coarse_threshold, temperatures=temperatures,
            batch_size=batch_size or (32 if dev.type == "cuda" else 4),
        )  # fmt: skip

    # -- preprocessing ------------------------------------------------------------------
    def stage_input(self, stage: Stage, ct: sitk.Image, suv: sitk.Image, q: LesionQuery) -> tuple[np.ndarray, MaskChannel]:
        """Normalised ``[3, X, Y, Z]`` float32 input of one lesion for one stage."""
        pre, geom = stage.pre, stage.geometry
        centre = q.box.centre
        chans = [
            to_xyz(crop_around(ct, centre, geom, pre.interpolation[0], compat=self.compat)),
            to_xyz(crop_around(suv, centre, geom, pre.interpolation[1], compat=self.compat)),
        ]
        if self.compat:
            target = q.target_label if stage.name == "coarse" else 0  # B8: the fine stage re-matches by IoU
            mask = reference_mask_channel(q.mask, centre, q.box.as_array(), geom, pre.interpolation[2], target)
        else:
            lesion = q.mask if q.label is None else sitk.Cast(q.mask == q.label, sitk.sitkUInt8)
            mask = corrected_mask_channel(lesion, centre, geom, pre.interpolation[2])
        chans.append(mask.values)
        stacked = np.stack([normalize(c, n) for c, n in zip(chans, pre.normalizers)])
        return stacked, mask

    @torch.inference_mode()
    def embed_images(self, stage: Stage, inputs: np.ndarray | torch.Tensor) -> torch.Tensor:
        """L2-normalised fp32 image embeddings ``[B, D]`` (one forward per ``batch_size``)."""
        x = torch.as_tensor(inputs)
        layout = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        out = []
        for start in range(0, x.shape[0], self.batch_size):
            chunk = x[start : start + self.batch_size].to(self.device).contiguous(memory_format=layout)
            feats = stage.net.encode_image(chunk).float()
            out.append(feats / feats.norm(dim=-1, keepdim=True))
        return torch.cat(out)

    # -- inference ------------------------------------------------------------------------
    def localize_images(self, ct: sitk.Image, suv: sitk.Image, queries: Sequence[LesionQuery]) -> list[LocalizerOutput]:
        """Localize lesions given SimpleITK images (CT in HU, SUV) and per-lesion queries."""
        ct, suv = as_float32(ct), as_float32(suv)
        queries = [q if q.mask.GetPixelID() == sitk.sitkFloat32 or not self.compat
                   else LesionQuery(q.box, as_float32(q.mask), q.label, q.target_label) for q in queries]  # fmt: skip
        results: list[LocalizerOutput] = []
        for start in range(0, len(queries), self.batch_size):
            results.extend(self._localize_chunk(ct, suv, queries[start : start + self.batch_size]))
        return results

    def _localize_chunk(self, ct: sitk.Image, suv: sitk.Image, queries: Sequence[LesionQuery]) -> list[LocalizerOutput]:
        coarse_in, coarse_masks = zip(*(self.stage_input(self.coarse, ct, suv, q) for q in queries))
        fine_in, fine_masks = zip(*(self.stage_input(self.fine, ct, suv, q) for q in queries))
        decisions = self.decide(np.stack(coarse_in), np.stack(fine_in), [q.box.size for q in queries])
        outputs = []
        for i, q in enumerate(queries):
            origin = crop_origin(q.box.centre, self.coarse.geometry, compat=self.compat)
            frac = outside_fraction([ct, suv], origin, self.coarse.geometry)
            outputs.append(self._output(q, decisions[i], coarse_masks[i], fine_masks[i], frac))
        return outputs

    def decide(
        self, coarse_inputs: np.ndarray | torch.Tensor, fine_inputs: np.ndarray | torch.Tensor,
        box_sizes: Sequence[Sequence[float]],
    ) -> list[Decision]:  # fmt: skip
        """The model part for prepared inputs ``[B, 3, X, Y, Z]`` of both stages.

        One batched forward per stage, scores against the cached text embeddings, then the
        reference ranking and decision per lesion (fine softmax over each lesion's own
        candidates only).
        """
        coarse_cos = (self.embed_images(self.coarse, coarse_inputs) @ self.coarse.text_emb.T).cpu()
        coarse_probs = hierarchy.scaled_softmax(coarse_cos)
        fine_cos = (self.embed_images(self.fine, fine_inputs) @ self.fine.text_emb.T).cpu()
        out = []
        for i, size in enumerate(box_sizes):
            ranking = hierarchy.rank_coarse(coarse_probs[i], self.coarse.words, self.coarse_topk)
            cands = hierarchy.fine_candidates(ranking, self.vocab)
            cos_i = fine_cos[i, torch.tensor([self.fine.word_index[w] for w in cands.words])]
            result = hierarchy.decide_fine(
                cands, hierarchy.scaled_softmax(cos_i).tolist(), ranking, self.vocab, size,
                fuse_coarse_threshold=self.fuse_coarse_threshold,
            )  # fmt: skip
            calibrated = self._calibrated(coarse_cos[i], ranking, cos_i, cands, result)
            out.append(Decision(ranking, cands, result, calibrated))
        return out

    def _calibrated(
        self, coarse_cos: torch.Tensor, coarse: hierarchy.CoarseResult, fine_cos: torch.Tensor,
        cands: hierarchy.FineCandidates, decision: hierarchy.FineResult,
    ) -> float | None:  # fmt: skip
        """Temperature-scaled probability of the decided label at the stage that decided it."""
        if self.temperatures is None:
            return None
        t_coarse, t_fine = self.temperatures
        if decision.large_lesion:
            p = (coarse_cos.float() / t_coarse).softmax(-1)
            return float(p[self.coarse.word_index[coarse.labels[0]]])
        p = (fine_cos.float() / t_fine).softmax(-1)
        return float(p[cands.words.index(decision.labels[0])])

    def _output(
        self, q: LesionQuery, d: Decision, coarse_mask: MaskChannel, fine_mask: MaskChannel, frac: float
    ) -> LocalizerOutput:
        coarse, decision, calibrated = d.coarse, d.fine, d.calibrated
        flags: list[Flag] = []
        if decision.large_lesion:
            flags.append(Flag("large_lesion", f"smallest box side {min(q.box.size):.1f} mm exceeds "
                              f"{hierarchy.LARGE_LESION_MM:.0f} mm: the coarse key is reported (HCL-AL rule)"))  # fmt: skip
        fallback = coarse_mask.fallback_used or fine_mask.fallback_used
        if fallback:
            stages = [n for n, m in (("coarse", coarse_mask), ("fine", fine_mask)) if m.fallback_used]
            flags.append(Flag("mask_fallback", f"lesion mask not found at model resolution in the {'/'.join(stages)} "
                              "crop; the half-spacing re-crop was used"))  # fmt: skip
        missing = not (coarse_mask.matched and fine_mask.matched)
        if missing:
            residual = coarse_mask.residual or fine_mask.residual
            flags.append(Flag("mask_missing", "lesion mask could not be placed in the crop; the mask channel is "
                              + ("left with other lesions' voxels (HCL-AL behaviour)" if residual else "empty")))  # fmt: skip
        if frac > 0:
            flags.append(Flag("crop_outside_scan", f"{100 * frac:.1f}% of the coarse crop lies outside the CT or "
                              "PET field of view and was filled with 0 (0 HU for CT)"))  # fmt: skip
        if decision.large_lesion:
            alternatives = tuple(RankedLabel(k, p) for k, p in zip(coarse.labels, coarse.probs))[:3]
        else:
            seen: dict[str, float] = {}
            for word, key, p in zip(decision.labels, decision.to_coarse, decision.probs):
                final = self.vocab.final(key, word)
                if final not in seen:
                    seen[final] = p
                if len(seen) == 3:
                    break
            alternatives = tuple(RankedLabel(k, p) for k, p in seen.items())
        return LocalizerOutput(
            final_label=decision.pred,
            coarse_ranking=tuple(RankedLabel(k, p) for k, p in zip(coarse.labels, coarse.probs)),
            fine_ranking=tuple(RankedLabel(w, p) for w, p in zip(decision.labels, decision.probs)),
            fine_to_coarse=decision.to_coarse,
            alternatives=alternatives,
            box=q.box,
            large_lesion=decision.large_lesion,
            mask_fallback=fallback,
            mask_missing=missing,
            outside_fraction=frac,
            geometry_mode=self.geometry_mode,
            model=self.model_info,
            calibrated_probability=calibrated,
            flags=tuple(flags),
        )

    # -- Volume API ------------------------------------------------------------------------
    def localize(
        self,
        ct: Volume,
        suv: Volume,
        lesion_masks: Sequence[Volume | np.ndarray],
        *,
        mask_grid: Volume | None = None,
        boxes: Sequence[LesionBox | None] | None = None,
    ) -> list[LocalizerOutput]:
        """Localize each lesion given as a binary mask (a Volume, or an array on ``mask_grid``).

        Boxes: in corrected mode the exact voxel-edge box of each mask unless ``boxes``
        supplies one (e.g. from the measurement step).  In hcl-al mode the box is always
        HCL-AL's ``calc_lesion_bbox`` of the mask (B1/B2 included), and the mask channel is
        matched in a multi-label image of all lesions (label = position + 1; where masks
        overlap the later lesion wins), as HCL-AL's ``SEG_MultiLabel`` input would be.
        """
        if boxes is not None and len(boxes) != len(lesion_masks):
            raise InputError("boxes must align with lesion_masks", code="localizer_input")
        mask_vols = [self._as_mask_volume(m, mask_grid) for m in lesion_masks]
        if not mask_vols:
            return []
        ct_img, suv_img = ct.to_sitk(), suv.to_sitk()
        bounds = []
        for i, mv in enumerate(mask_vols):
            nz = np.nonzero(mv.array)
            if nz[0].size == 0:
                raise InputError(f"lesion mask {i} is empty", code="lesion_mask_empty")
            k, j, ii = (np.asarray(a) for a in nz)
            bounds.append((np.array([ii.min(), j.min(), k.min()]), np.array([ii.max(), j.max(), k.max()])))
        queries: list[LesionQuery] = []
        if self.compat:
            grid = mask_vols[0]
            if any(m.array.shape != grid.array.shape or not np.allclose(m.affine, grid.affine, atol=1e-4) for m in mask_vols):
                raise GeometryError("hcl-al mode needs all lesion masks on one grid (one multi-label image)",
                                    code="mask_grid_mismatch")  # fmt: skip
            labels = np.zeros(grid.array.shape, dtype=np.float32)
            for i, mv in enumerate(mask_vols):
                labels[mv.array != 0] = i + 1
            multi = grid.with_array(labels).to_sitk()
            for vmin, vmax in bounds:
                queries.append(LesionQuery(reference_box_from_bounds(multi, vmin, vmax), multi))
        else:
            for i, (mv, (vmin, vmax)) in enumerate(zip(mask_vols, bounds)):
                img = mv.with_array((mv.array != 0).astype(np.uint8)).to_sitk()
                box = boxes[i] if boxes is not None and boxes[i] is not None else exact_box_from_bounds(img, vmin, vmax)
                queries.append(LesionQuery(box, img))  # type: ignore[arg-type]
        return self.localize_images(ct_img, suv_img, queries)

    @staticmethod
    def _as_mask_volume(mask: Volume | np.ndarray, grid: Volume | None) -> Volume:
        if isinstance(mask, Volume):
            return mask
        if grid is None:
            raise InputError("a lesion mask given as an array needs mask_grid", code="localizer_input")
        arr = np.asarray(mask)
        if arr.shape != grid.array.shape:
            raise GeometryError(f"lesion mask shape {arr.shape} differs from its grid {grid.array.shape}",
                                code="mask_grid_mismatch")  # fmt: skip
        return grid.with_array(arr)
