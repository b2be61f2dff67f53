"""Worker-facing ItemizedCLIP API: every finding's score, embedding and map from one visual forward.

Per study (ItemizedCLIP, arXiv 2512.11141):

* the prompt set's texts are encoded **once** when the encoder is built (``t_k`` raw
  ``text.proj`` outputs, normalised inside :func:`~.model.item_head`);
* one forward of the HLIP trunk gives the class token (the study embedding, L2-normalised,
  usable for similar-study search under this model's id) and all patch tokens;
* the attention-pooling block gives, per finding, the conditioned embedding ``c_k``, the score
  ``s_k = <n(c_k), t_k>`` (a raw cosine in [−1, 1]; ``logit_scale``/``logit_bias`` are unused at
  inference) and the head-averaged attention over the ``L`` tokens **plus the null slot**.

Map rule recorded with every result (:data:`MAP_RULE`): the token weights are the raw
head-averaged attention (no renormalisation, null slot kept separately as ``null_weight``),
reshaped to the input's axis order ``[d, h, w]`` = ``[z, y, x]`` and placed in patient LPS by
:class:`~.geometry.TokenGrid`.  Presence needs a per-site threshold on the cosine from
configuration; without one ``present`` is ``None`` (no built-in threshold, no test-set threshold).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.prompts import PromptSetError
from library.prompts.itemized import DEFAULT_SET, ItemPromptSet, load_item_prompt_set
from pipelines.dicom.volume import Volume
from pipelines.errors import InputError, ModelError
from pipelines.findings import Flag, ModelInfo
from pipelines.models.itemizedclip import geometry
from pipelines.models.itemizedclip.model import CHEST_MODEL, IMPLEMENTATION, ItemizedCLIP, forward_items, load_model
from pipelines.models.study_encoder import model as hlip_model
from pipelines.models.study_encoder import preprocess, thorax, visual

log = logging.getLogger(__name__)

MAP_RULE = ("itemizedclip visual_attn weights, mean over heads, need_weights=True on L2-normalised text and "
            "tokens; null slot (last column) kept as null_weight; token weights not renormalised")  # fmt: skip


@dataclass(frozen=True)
class ItemizedClipConfig:
    """Where the model is and how it is used; thresholds (cosines) are per-site calibration, keyed by finding id."""

    checkpoint: str | Path
    text_dir: str | Path
    model_name: str = CHEST_MODEL
    model_id: str | None = None  # default "itemizedclip-<first 12 hex of the checkpoint sha256>"
    prompt_set: str = DEFAULT_SET
    thresholds: Mapping[str, float] = field(default_factory=dict)
    expected_sha256: str = ""
    device: str = "cpu"
    max_chest_extent_mm: float = 400.0
    config_dir: str | Path | None = None  # extra open_clip config directory (tests, site variants)


@dataclass(frozen=True)
class ItemFinding:
    """One finding of the prompt set, for one study."""

    finding_id: str
    finding: str
    prompt: str
    score: float  # raw cosine <n(c_k), t_k>
    threshold: float | None
    present: bool | None
    embedding: np.ndarray  # float32 [E], n(c_k): the finding-conditioned visual embedding
    null_weight: float  # attention share on the null slot ("nowhere")
    token_map: np.ndarray  # float32 [d, h, w] head-averaged attention on the tokens (input axis order)
    peak_dhw: tuple[int, int, int]
    peak_lps: tuple[float, float, float]  # LPS mm of the peak token's centre
    peak_weight: float


@dataclass(frozen=True)
class ItemizedEncoding:
    """A study's ItemizedCLIP encoding: the embedding plus one scored, located finding per prompt item."""
    model: ModelInfo
    study_embedding: np.ndarray  # float32 [E], L2-normalised class token
    findings: tuple[ItemFinding, ...]
    grid: geometry.TokenGrid
    preprocessing_version: str
    prompt_set_version: str
    map_rule: str = MAP_RULE
    crop_description: str = ""
    flags: tuple[Flag, ...] = ()
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    def finding(self, finding_id: str) -> ItemFinding:
        """The finding with ``finding_id``; raises a model error for an unknown one."""
        for f in self.findings:
            if f.finding_id == finding_id:
                return f
        raise KeyError(finding_id)

    def to_json(self) -> dict[str, Any]:
        """Scores, peaks and provenance as plain JSON (maps and embeddings go to :meth:`save_maps`)."""
        return {
            "model": dataclasses.asdict(self.model),
            "study_embedding": [float(v) for v in self.study_embedding],
            "findings": [{"finding_id": f.finding_id, "finding": f.finding, "prompt": f.prompt, "score": f.score,
                          "threshold": f.threshold, "present": f.present, "null_weight": f.null_weight,
                          "peak_dhw": list(f.peak_dhw), "peak_lps": list(f.peak_lps), "peak_weight": f.peak_weight}
                         for f in self.findings],
            "grid": self.grid.to_json(),
            "preprocessing_version": self.preprocessing_version,
            "prompt_set_version": self.prompt_set_version,
            "map_rule": self.map_rule,
            "crop_description": self.crop_description,
            "flags": [dataclasses.asdict(f) for f in self.flags],
        }  # fmt: skip

    def save_maps(self, path: str | Path) -> Path:
        """Every finding's token map, null weight and embedding, float16, with the grid geometry (``.npz``).

        float16 keeps ~3 significant digits: enough to display and to find peaks, **not** for
        the exactness contract, which applies to the float32 values in memory.  Read back with
        :func:`load_maps` (no pickling on either side).
        """
        out = Path(path)
        np.savez_compressed(
            out,
            finding_ids=np.array([f.finding_id for f in self.findings], dtype=np.str_),
            maps=np.stack([f.token_map for f in self.findings]).astype(np.float16),
            null_weight=np.array([f.null_weight for f in self.findings], dtype=np.float16),
            embeddings=np.stack([f.embedding for f in self.findings]).astype(np.float16),
            token_affine_lps=self.grid.affine,
            crop_affine_lps=self.grid.crop_affine,
            patch_dhw=np.array(self.grid.patch, dtype=np.int64),
            frame_of_reference_uid=np.array(self.grid.frame_of_reference_uid, dtype=np.str_),
            model_id=np.array(self.model.model_id, dtype=np.str_),
            map_rule=np.array(self.map_rule, dtype=np.str_),
        )  # fmt: skip
        return out if out.suffix == ".npz" else out.with_name(out.name + ".npz")


@dataclass(frozen=True)
class StoredMaps:
    """Token maps read back from their ``.npz`` file, with the grid that places them in LPS."""
    finding_ids: tuple[str, ...]
    maps: np.ndarray  # float32 [K, d, h, w] (from float16)
    null_weight: np.ndarray  # float32 [K]
    embeddings: np.ndarray  # float32 [K, E]
    grid: geometry.TokenGrid
    model_id: str
    map_rule: str


def load_maps(path: str | Path) -> StoredMaps:
    """Read a :meth:`ItemizedEncoding.save_maps` file (``allow_pickle=False``)."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            maps = z["maps"].astype(np.float32)
            d, h, w = (int(v) for v in maps.shape[1:])
            pd, ph, pw = (int(v) for v in z["patch_dhw"])
            grid = geometry.TokenGrid((d, h, w), (pd, ph, pw),
                                      z["crop_affine_lps"].astype(np.float64), str(z["frame_of_reference_uid"]))  # fmt: skip
            return StoredMaps(tuple(str(v) for v in z["finding_ids"]), maps, z["null_weight"].astype(np.float32),
                              z["embeddings"].astype(np.float32), grid, str(z["model_id"]), str(z["map_rule"]))  # fmt: skip
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"cannot read ItemizedCLIP maps {Path(path).name}: {exc}", code="maps_unreadable") from exc


def check_thresholds(prompts: ItemPromptSet, thresholds: Mapping[str, float]) -> None:
    """Refuse thresholds for unknown findings, or outside the cosine range [−1, 1]."""
    unknown = sorted(set(thresholds) - set(prompts.ids))
    if unknown:
        raise ModelError(f"thresholds configured for unknown findings {unknown}; known: {sorted(prompts.ids)}",
                         code="threshold_config")  # fmt: skip
    bad = {k: v for k, v in thresholds.items() if not -1.0 <= float(v) <= 1.0}
    if bad:
        raise ModelError(f"ItemizedCLIP thresholds are cosines and must lie in [-1, 1]: {bad}", code="threshold_config")


class ItemizedClipEncoder:
    """Published chest-CT ItemizedCLIP: CT volume → study embedding + per-finding scores and maps."""

    def __init__(self, config: ItemizedClipConfig) -> None:
        self.config = config
        model, ckpt = load_model(config.checkpoint, config.text_dir, model_name=config.model_name,
                                 config_dir=config.config_dir, expected_sha256=config.expected_sha256)  # fmt: skip
        self.model: ItemizedCLIP = model.to(config.device)
        self.checkpoint_sha256 = ckpt.sha256
        self.adjustments = ckpt.adjustments
        try:
            self.prompts = load_item_prompt_set(config.prompt_set)
        except PromptSetError as exc:
            raise ModelError(str(exc), code="prompt_set_invalid") from exc
        check_thresholds(self.prompts, config.thresholds)
        import open_clip

        cfg = open_clip.get_model_config(config.model_name)
        self.context_length = int(cfg["text_cfg"].get("context_length", 77))
        self.tokenizer = hlip_model.tokenizer_for(config.text_dir, self.context_length)
        self.spec = visual.registered_spec(str(cfg["vision_cfg"]["timm_model_name"]))
        self.text_features = self.encode_texts(self.prompts.texts())
        text_hash = hlip_model._dir_digest(Path(config.text_dir))
        self.model_info = ModelInfo(
            model_id=config.model_id or f"itemizedclip-{ckpt.sha256[:12]}",
            name=f"ItemizedCLIP ({config.model_name})",
            version=f"{IMPLEMENTATION}; prompts {self.prompts.name} {self.prompts.version}",
            sha256=ckpt.sha256,
            library_hash=hashlib.sha256(f"{self.prompts.sha256}\n{text_hash}\n".encode()).hexdigest(),
        )
        log.info("ItemizedCLIP %s ready: %s sha256=%s findings=%d", self.model_info.model_id, config.model_name,
                 ckpt.sha256[:12], len(self.prompts.findings))  # fmt: skip

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Raw ``text.proj`` outputs ``[K, E]`` (fp32, on the model's device) for prompt strings."""
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(list(texts)).to(device)).float()

    @torch.inference_mode()
    def analyse(self, prepared: preprocess.PreparedInput, *, frame_of_reference_uid: str = "",
                flags: Sequence[Flag] = (), crop_description: str = "") -> ItemizedEncoding:  # fmt: skip
        """Every finding's score, embedding and map for one preprocessed input, in one visual forward."""
        t0 = time.perf_counter()
        param = next(self.model.parameters())
        x = prepared.tensor.to(param.device, param.dtype)
        if x.shape[0] != 1:
            raise InputError(f"analyse takes one study, got a batch of {x.shape[0]}", code="batch_unsupported")
        out = forward_items(self.model, x, self.text_features)
        grid = geometry.TokenGrid.from_prepared(prepared, self.spec.patch_size, frame_of_reference_uid)
        if out.attention.shape[-1] != grid.n_tokens + 1:
            raise ModelError(f"{out.attention.shape[-1] - 1} tokens for a {grid.grid} grid", code="map_shape")
        attention = out.attention[0].float().cpu().numpy()
        embeddings = torch.nn.functional.normalize(out.conditioned[0].float(), dim=-1).cpu().numpy()
        scores = out.scores[0].float().cpu().numpy()
        maps = grid.reshape(attention[:, :-1])
        findings = []
        for k, item in enumerate(self.prompts.findings):
            dhw, lps = grid.peak(maps[k])
            t = self.config.thresholds.get(item.id)
            s = float(scores[k])
            findings.append(ItemFinding(
                finding_id=item.id, finding=item.finding, prompt=self.prompts.text(item), score=s,
                threshold=None if t is None else float(t), present=None if t is None else bool(s > t),
                embedding=embeddings[k].astype(np.float32), null_weight=float(attention[k, -1]),
                token_map=maps[k].astype(np.float32), peak_dhw=dhw, peak_lps=(float(lps[0]), float(lps[1]), float(lps[2])),
                peak_weight=float(maps[k][dhw]),
            ))  # fmt: skip
        g = torch.nn.functional.normalize(out.global_features[0].float(), dim=-1).cpu().numpy()
        return ItemizedEncoding(
            model=self.model_info, study_embedding=g.astype(np.float32), findings=tuple(findings), grid=grid,
            preprocessing_version=preprocess.PREPROCESSING_VERSION,
            prompt_set_version=f"{self.prompts.name}/{self.prompts.version}", crop_description=crop_description,
            flags=tuple(flags), timings={"forward_s": time.perf_counter() - t0},
        )  # fmt: skip

    def prepare(self, ct: Volume, *, body_part_examined: str | None = None,
                ) -> tuple[thorax.ThoraxSelection, preprocess.PreparedInput]:  # fmt: skip
        """The HLIP chest-CT thorax selection and preprocessing (ItemizedCLIP uses HLIP v1's, §5)."""
        if self.spec.max_num_scans != 1:
            raise ModelError(f"no preprocessing implemented for {self.config.model_name}", code="preprocessing_unknown")
        sel = thorax.select_thorax(ct, body_part_examined, max_chest_extent_mm=self.config.max_chest_extent_mm)
        if not sel.covers_chest:
            raise InputError(f"CT series {ct.series_instance_uid} does not cover the chest: {sel.reason}",
                             code="ct_not_chest")  # fmt: skip
        params = preprocess.ChestCtParams(size_zyx=self.spec.img_size)
        return sel, preprocess.preprocess_chest_ct(ct, centre_lps=sel.centre_lps, params=params)

    def encode(self, ct: Volume, *, body_part_examined: str | None = None) -> ItemizedEncoding:
        """Encode one chest-covering CT; raises :class:`InputError` (``ct_not_chest``) otherwise."""
        sel, prepared = self.prepare(ct, body_part_examined=body_part_examined)
        return self.analyse(prepared, frame_of_reference_uid=ct.frame_of_reference_uid,
                            flags=hlip_model.input_flags(sel), crop_description=sel.describe())  # fmt: skip
