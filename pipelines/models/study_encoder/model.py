"""Build the HLIP CLIP model with open_clip, load published checkpoints strictly, encode studies.

* The visual trunk variants are registered in timm (:mod:`.visual`), and the open_clip model
  configs in ``configs/`` are registered with the public ``open_clip.add_model_config`` (no
  edits to open_clip, no private registries), so ``open_clip.create_model(name, ...)`` builds
  the model.
* The text tower is open_clip's ``HFTextEncoder`` built **from a local directory** the user
  supplies beside the checkpoint (``config.json`` + tokenizer files such as ``vocab.txt``):
  ``hf_model_name``/``hf_tokenizer_name`` are pointed at it and ``hf_model_pretrained`` is
  false, so nothing is downloaded.  Its weights come from the HLIP checkpoint (the chest
  model's text LayerNorms and projection differ from stock CXR-BERT, hlip-compat §7).
* Checkpoints: the training dict (``{"epoch", "name", "state_dict", ...}``) or a plain state
  dict, ``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors``; the DDP ``module.``
  prefix is stripped; the early ``series_posemb`` key is renamed to ``sequential_posemb``
  (§8, §15); then ``load_state_dict(strict=True)``.  The file's SHA-256 is recorded in
  :class:`~pipelines.findings.ModelInfo`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from library.prompts import PromptSet, PromptSetError, load_prompt_set
from pipelines.dicom.volume import Volume
from pipelines.errors import InputError, ModelError
from pipelines.findings import Flag, ModelInfo, StudyEncoding
from pipelines.models.checkpoints import sha256_file, state_dict_sha256, strip_module_prefix
from pipelines.models.study_encoder import preprocess, thorax, visual, zeroshot

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Version of Locus's HLIP re-implementation (bump when outputs can change).
IMPLEMENTATION = "locus-hlip-1.0"
_RENAMES = {"visual.trunk.series_posemb": "visual.trunk.sequential_posemb"}
_registered_dirs: set[Path] = set()


def register_configs(extra_dir: str | Path | None = None) -> None:
    """Register the published trunk variants with timm and Locus's model configs with open_clip."""
    import open_clip

    visual.register_published_variants()
    for d in (CONFIG_DIR, Path(extra_dir).resolve() if extra_dir else None):
        if d is not None and d not in _registered_dirs:
            open_clip.add_model_config(d)
            _registered_dirs.add(d)


@dataclass(frozen=True)
class HlipCheckpoint:
    """A loaded HLIP checkpoint, pinned by its file hash."""
    path: str
    sha256: str
    state_dict: dict[str, torch.Tensor]
    renamed: tuple[str, ...] = ()


def read_checkpoint(path: str | Path) -> HlipCheckpoint:
    """Read an HLIP checkpoint (training dict or plain state dict; .pt or .safetensors)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"HLIP checkpoint not found: {p}", code="checkpoint_missing")
    digest = sha256_file(p)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a bad file
        raise ModelError(f"{p.name} is not a loadable weights-only checkpoint: {type(exc).__name__}: {str(exc)[:200]}",
                         code="checkpoint_unreadable") from exc  # fmt: skip
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{p.name} holds no state dict of tensors", code="checkpoint_layout")
    sd = strip_module_prefix(obj)
    renamed = []
    for old, new in _RENAMES.items():
        if old in sd and new not in sd:
            sd[new] = sd.pop(old)
            renamed.append(f"{old}->{new}")
    return HlipCheckpoint(str(p), digest, sd, tuple(renamed))


def _check_text_dir(text_dir: Path) -> None:
    if not (text_dir / "config.json").is_file():
        raise ModelError(f"text tower directory {text_dir} lacks config.json (supply the BERT config beside the checkpoint)",
                         code="text_tower_missing")  # fmt: skip
    if not any((text_dir / n).is_file() for n in ("vocab.txt", "tokenizer.json")):
        raise ModelError(f"text tower directory {text_dir} has no tokenizer files (vocab.txt or tokenizer.json)",
                         code="text_tower_missing")  # fmt: skip


class _RandomInitWarningFilter(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded … initialized randomly" warning.

    Why: Locus builds every model without pretrained weights on purpose and loads the
    checkpoint strictly right after, so the warning is false and alarming in a log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _strict_load_follows() -> Iterator[None]:
    flt = _RandomInitWarningFilter()
    loggers = [logging.getLogger(), logging.getLogger("open_clip"), logging.getLogger("open_clip.factory")]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


def build_model(model_name: str, text_dir: str | Path) -> nn.Module:
    """``open_clip.create_model`` for a registered HLIP config, text tower from ``text_dir`` (random weights).

    Callers load a checkpoint strictly right after (:func:`load_strict`), so open_clip's
    random-initialisation warning is silenced here.
    """
    import open_clip

    register_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ModelError(f"no open_clip config named {model_name!r}", code="model_unknown")
    text_dir = Path(text_dir).resolve()
    _check_text_dir(text_dir)
    text_cfg = copy.deepcopy(cfg["text_cfg"])
    text_cfg.update(hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir), hf_model_pretrained=False)
    with _strict_load_follows():
        return open_clip.create_model(model_name, pretrained=None, pretrained_image=False, pretrained_text=False,
                                      text_cfg=text_cfg, output_dict=True)  # fmt: skip


class VisionOnly(nn.Module):
    """The visual tower of an HLIP model alone, for embeddings without a text tower.

    Same module names under ``visual.`` and the same ``encode_image`` arithmetic as
    open_clip's CLIP (visual features, optionally L2-normalised), so embeddings equal the full
    model's for the same visual weights.
    """

    def __init__(self, visual_tower: nn.Module) -> None:
        super().__init__()
        self.visual = visual_tower

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Visual features of an input batch, unit-normalised on request (CLIP's interface)."""
        features = self.visual(image)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features


def build_vision_model(model_name: str) -> VisionOnly:
    """The visual tower of a registered HLIP config (random weights; a strict load follows)."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    register_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ModelError(f"no open_clip config named {model_name!r}", code="model_unknown")
    vision_cfg = CLIPVisionCfg(**{**cfg["vision_cfg"], "timm_model_pretrained": False})
    return VisionOnly(_build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=cfg.get("quick_gelu", False)))


def is_vision_only(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A checkpoint with visual weights and no text tower (``text.*``)."""
    return any(k.startswith("visual.") for k in state_dict) and not any(k.startswith("text.") for k in state_dict)


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)`` with a readable ModelError listing what differs."""
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:
        own = model.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shapes = [k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape)]
        raise ModelError(
            f"checkpoint does not match the HLIP layout: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(shapes)} with other shapes (e.g. {sorted(shapes)[:3]})",
            code="checkpoint_layout",
        ) from exc


def tokenizer_for(text_dir: str | Path, context_length: int):
    """The Hugging Face tokenizer in ``text_dir`` (local files only: no downloads at run time)."""
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(str(Path(text_dir).resolve()), context_length=context_length)


def _dir_digest(text_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(text_dir.iterdir()):
        if p.is_file() and p.suffix in (".json", ".txt", ".model"):
            h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class StudyEncoderConfig:
    """Where the model is and how it is used; thresholds are per-site calibration, keyed by finding id."""

    checkpoint: str | Path
    text_dir: str | Path | None  # None (or a vision-only checkpoint): embeddings only, no zero-shot
    model_name: str = "vit_base_singlescan_h2_token2744"
    model_id: str | None = None  # default "hlip-<first 12 hex of the checkpoint sha256>"
    prompt_set: str = "ct_rate_hlip_v1"
    thresholds: Mapping[str, float] = field(default_factory=dict)
    expected_sha256: str = ""  # refuse a checkpoint that changed on disk
    device: str = "cpu"
    max_chest_extent_mm: float = 400.0
    config_dir: str | Path | None = None  # extra open_clip config directory (tests, site variants)


class StudyEncoder:
    """HLIP study encoder: CT volume → study embedding + zero-shot findings (:class:`StudyEncoding`)."""

    def __init__(self, config: StudyEncoderConfig) -> None:
        register_configs(config.config_dir)
        ckpt = read_checkpoint(config.checkpoint)
        if config.expected_sha256 and ckpt.sha256 != config.expected_sha256:
            raise ModelError(f"HLIP checkpoint sha256 {ckpt.sha256[:16]}… differs from the pinned "
                             f"{config.expected_sha256[:16]}…", code="model_hash_mismatch")  # fmt: skip
        self.config = config
        self.checkpoint = ckpt
        # Embeddings need only the visual tower: a vision-only checkpoint, or no text directory,
        # gives embeddings without zero-shot findings (which need the text tower, and say so).
        self.vision_only = config.text_dir is None or is_vision_only(ckpt.state_dict)
        visual_sd = {k: v for k, v in ckpt.state_dict.items() if k.startswith("visual.")}
        self.classifier: zeroshot.ZeroShotClassifier | None = None
        if self.vision_only:
            self.model: nn.Module = build_vision_model(config.model_name)
            load_strict(self.model, visual_sd)
        else:
            assert config.text_dir is not None
            self.model = build_model(config.model_name, config.text_dir)
            load_strict(self.model, ckpt.state_dict)
        self.model.eval().to(config.device)
        try:
            self.prompts: PromptSet = load_prompt_set(config.prompt_set)
        except PromptSetError as exc:
            raise ModelError(str(exc), code="prompt_set_invalid") from exc
        library_hash = None
        if not self.vision_only:
            assert config.text_dir is not None
            zeroshot.check_thresholds(self.prompts, config.thresholds)
            import open_clip

            ctx = int(open_clip.get_model_config(config.model_name)["text_cfg"].get("context_length", 77))
            self.tokenizer = tokenizer_for(config.text_dir, ctx)
            self.classifier = zeroshot.build_classifier(self.model, self.tokenizer, self.prompts)
            text_hash = _dir_digest(Path(config.text_dir))
            library_hash = hashlib.sha256(f"{self.prompts.sha256}\n{text_hash}\n".encode()).hexdigest()
        self.spec = visual.registered_spec(_trunk_name(config.model_name))
        self.last_timings: dict[str, float] = {}
        # Identity from the weights content, not the file bytes (.pt, .safetensors, re-saved copies):
        # the id names the visual weights (what an embedding depends on), sha256 all loaded weights.
        loaded = visual_sd if self.vision_only else ckpt.state_dict
        self.model_info = ModelInfo(
            model_id=config.model_id or f"hlip-{state_dict_sha256(visual_sd)[:12]}",
            name=f"HLIP study encoder ({config.model_name})",
            version=f"{IMPLEMENTATION}; " + ("vision only (no zero-shot)" if self.vision_only
                                               else f"prompts {self.prompts.name} {self.prompts.version}"),
            sha256=state_dict_sha256(loaded),
            library_hash=library_hash,
        )
        log.info("HLIP encoder %s ready: %s sha256=%s renamed=%s", self.model_info.model_id, config.model_name,
                 ckpt.sha256[:12], list(ckpt.renamed))  # fmt: skip

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm study embeddings ``[B, E]`` for model inputs ``[B, N, 1, D, H, W]``."""
        param = next(self.model.parameters())
        encode = cast("Callable[..., torch.Tensor]", self.model.encode_image)  # CLIP or VisionOnly method
        return encode(x.to(param.device, param.dtype), normalize=True).float()

    def prepare(self, ct: Volume, *, body_part_examined: str | None = None
                ) -> tuple[thorax.ThoraxSelection, preprocess.PreparedInput]:  # fmt: skip
        """Thorax selection + published chest-CT preprocessing (what :meth:`encode` feeds the model).

        Raises :class:`InputError` (``ct_not_chest``) for a CT without detectable lungs.
        """
        if self.spec.max_num_scans != 1:  # only single-scan (chest CT) preprocessing is implemented
            raise ModelError(f"no preprocessing implemented for {self.config.model_name}", code="preprocessing_unknown")
        sel = thorax.select_thorax(ct, body_part_examined, max_chest_extent_mm=self.config.max_chest_extent_mm)
        if not sel.covers_chest:
            raise InputError(f"CT series {ct.series_instance_uid} does not cover the chest: {sel.reason}",
                             code="ct_not_chest")  # fmt: skip
        params = preprocess.ChestCtParams(size_zyx=self.spec.img_size)
        return sel, preprocess.preprocess_chest_ct(ct, centre_lps=sel.centre_lps, params=params)

    def encode(self, ct: Volume, *, body_part_examined: str | None = None) -> StudyEncoding:
        """Encode one chest-covering CT; raises :class:`InputError` (``ct_not_chest``) otherwise."""
        t0 = time.perf_counter()
        sel, prepared = self.prepare(ct, body_part_examined=body_part_examined)
        t1 = time.perf_counter()
        emb = self.embed(prepared.tensor)
        t2 = time.perf_counter()
        scores = self.classifier.scores(emb[0]) if self.classifier is not None else None
        self.last_timings = {"preprocess_s": t1 - t0, "forward_s": t2 - t1, "zeroshot_s": time.perf_counter() - t2}
        lo, hi = prepared.crop_lps_min, prepared.crop_lps_max
        crop = (f"{sel.describe()}; crop LPS x {lo[0]:.0f}..{hi[0]:.0f}, y {lo[1]:.0f}..{hi[1]:.0f}, "
                f"z {lo[2]:.0f}..{hi[2]:.0f} mm; axes {prepared.description['axes']}")  # fmt: skip
        return StudyEncoding(
            model=self.model_info,
            embedding=tuple(float(v) for v in emb[0].tolist()),
            preprocessing_version=preprocess.PREPROCESSING_VERSION,
            prompt_set_version=None if scores is None else f"{self.prompts.name}/{self.prompts.version}",
            findings=() if scores is None else zeroshot.to_findings(scores, self.prompts, self.config.thresholds),
            crop_description=crop,
            flags=input_flags(sel) + self.zero_shot_flags(),
        )

    def zero_shot_flags(self) -> tuple[Flag, ...]:
        """Why there are no zero-shot findings, when the encoder has no text tower."""
        if not self.vision_only:
            return ()
        why = ("the checkpoint holds no text tower" if is_vision_only(self.checkpoint.state_dict)
               else "no text tower directory is configured (models.study_encoder_text_dir)")
        return (Flag("zero_shot_unavailable", f"study embedding only: {why}; zero-shot findings need the HLIP "
                     "text tower (a full checkpoint and its text directory)"),)  # fmt: skip


def input_flags(sel: thorax.ThoraxSelection) -> tuple[Flag, ...]:
    """What a reader of any output of this encoder must know about its input (SR, DB, maps)."""
    flags = []
    if not preprocess.ORIENTATION_VALIDATED:
        flags.append(Flag("hlip_orientation_unvalidated", "the CT axis orientation expected by the HLIP chest model "
                          "has not been validated on a CT-RATE reference case"))  # fmt: skip
    if sel.mode == "lung_centred":
        flags.append(Flag("hlip_thorax_cropped", "whole-body CT cropped to a 336 mm slab around the lungs; "
                          "the model was trained on diagnostic chest CT"))  # fmt: skip
    return tuple(flags)


def _trunk_name(model_name: str) -> str:
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    return str(cfg["vision_cfg"]["timm_model_name"]) if cfg else model_name
