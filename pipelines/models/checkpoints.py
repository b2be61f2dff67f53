"""Safe loading of HCL-AL ``params.pth`` checkpoints (plain and "uAI_model" encrypted).

HCL-AL (``md_clip3d``) saves one ``torch.save`` dict per stage (HCL-AL, Gao et al. 2025):
``net`` (architecture name), ``state_dict`` (DataParallel, ``module.`` prefix), and the
preprocessing the network was trained with: ``spacing``, ``crop_size``,
``crop_normalizers``, ``interpolation``, ``input_channel``, ``lesion_idx``, ``max_stride``,
``sample_method``.  Locus reads every preprocessing value from the file and never assumes
the published defaults, because axis order, crop geometry and normalisation are baked into
the weights (a wrong value gives garbage, not an error).

Differences from the reference loader, on purpose (bug B15):

* ``torch.load(weights_only=True, map_location="cpu")``: a checkpoint cannot execute
  code, and GPU-saved tensors load on CPU hosts; the device is chosen later.
* Typed :class:`~pipelines.errors.ModelError` with a stable ``code`` instead of asserts.

The encrypted variant is obfuscation, not security: the file starts with the tag
``b"uAI_model"`` NUL-padded to 128 bytes, followed by base64 of AES-128-CFB (8-bit
segments, pycryptodome's default) of ``torch_bytes + b"\\x01" + NUL padding to 16``, with
key = IV = a 16-byte constant published in the upstream repository
(``md_clip3d/utils/base/crypto.py``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.errors import ModelError

log = logging.getLogger(__name__)

UAI_TAG = b"uAI_model"
UAI_HEADER_BYTES = 128
#: Key (and IV) hard-coded in HCL-AL ``md_clip3d/utils/base/crypto.py`` (commit a548e25).
UAI_DEFAULT_KEY = b"*c!q9Kj*k?2>+5@p"

#: Interpolation names accepted in ``state['interpolation']`` (reference ``image_crop``).
INTERPOLATIONS = ("linear", "nn")


@dataclass(frozen=True)
class Normalizer:
    """Fixed intensity normalizer (reference ``FixedNormalizer``, type 0).

    ``(v - mean) / (stddev + 1e-8)``, then clipped to [-1, 1] when ``clip`` is set.
    """

    mean: float
    stddev: float
    clip: bool

    def to_json(self) -> dict[str, Any]:
        """The normalizer in HCL-AL's ``params.pth`` JSON form."""
        return {"type": 0, "mean": self.mean, "stddev": self.stddev, "clip": self.clip}


@dataclass(frozen=True)
class Preprocessing:
    """Crop and intensity settings of one stage, read from the checkpoint."""

    spacing: tuple[float, float, float]  # mm along x, y, z of the crop grid
    crop_size: tuple[int, int, int]  # voxels along x, y, z
    normalizers: tuple[Normalizer, ...]  # one per input channel
    interpolation: tuple[str, ...]  # "linear" | "nn", one per input channel
    input_channel: int
    lesion_idx: tuple[int, ...]  # channels holding the lesion mask
    max_stride: int
    sample_method: str

    def to_json(self) -> dict[str, Any]:
        """The preprocessing in HCL-AL's JSON form."""
        return {
            "spacing": list(self.spacing),
            "crop_size": list(self.crop_size),
            "crop_normalizers": [n.to_json() for n in self.normalizers],
            "interpolation": list(self.interpolation),
            "input_channel": self.input_channel,
            "lesion_idx": list(self.lesion_idx),
            "max_stride": self.max_stride,
            "sample_method": self.sample_method,
        }


@dataclass(frozen=True)
class HclalCheckpoint:
    """One loaded HCL-AL stage checkpoint (weights still on CPU)."""

    path: str
    sha256: str  # of the file as stored (encrypted bytes for encrypted files)
    encrypted: bool
    net: str
    preprocessing: Preprocessing
    state_dict: dict[str, torch.Tensor]  # ``module.`` prefix removed
    epoch: int | None = None
    batch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other metadata keys, verbatim
    #: :func:`state_dict_sha256` of ``state_dict``: the same for the plain and the encrypted copy
    #: of one network, so it (not ``sha256``) identifies the model.
    content_sha256: str = ""


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes (model ids and reports pin weights by it)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


#: Prefix of the canonical weights hash; bump if the canonical form ever changes.
STATE_DICT_HASH_FORMAT = b"locus-state-dict-sha256-v1\n"


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Canonical SHA-256 of a network's weights content, independent of how the file stores them.

    Why: the same network saved plain, "uAI_model"-encrypted, as ``.pt`` or ``.safetensors``
    has different file bytes but is the same model; results must name the model, not the
    file.  Hashed per tensor in sorted name order: name, dtype, shape, then the raw
    C-contiguous little-endian bytes of the values.
    """
    h = hashlib.sha256(STATE_DICT_HASH_FORMAT)
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        h.update(f"{name}\0{dtype}\0{','.join(str(n) for n in t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the buffer itself: no copy of the bytes
    return h.hexdigest()


def is_encrypted(data: bytes) -> bool:
    """Whether a checkpoint is in the encrypted release format (refused: no key ships)."""
    return data[: len(UAI_TAG)] == UAI_TAG


def decrypt_uai(data: bytes, key: bytes = UAI_DEFAULT_KEY) -> bytes:
    """Return the ``torch.save`` payload of a "uAI_model" file.

    Steps (reference ``Crypto.bytes_decrypt``): skip the 128-byte header, base64-decode,
    AES-CFB-8 decrypt with key = IV, strip trailing NULs, drop the final ``0x01`` marker.
    The marker is checked, so a wrong key or cipher mode fails loudly here instead of as a
    confusing unpickling error.
    """
    from Crypto.Cipher import AES  # pycryptodome; imported lazily (only encrypted files need it)

    if len(key) != 16:
        raise ModelError("uAI_model key must be 16 bytes (AES-128)", code="checkpoint_key_invalid")
    if not is_encrypted(data):
        raise ModelError("file does not start with the uAI_model tag", code="checkpoint_not_encrypted")
    try:
        cipher_text = base64.b64decode(data[UAI_HEADER_BYTES:], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ModelError(f"uAI_model body is not valid base64: {exc}", code="checkpoint_corrupt") from exc
    plain = AES.new(key, AES.MODE_CFB, iv=key, segment_size=8).decrypt(cipher_text)
    plain = plain.rstrip(b"\0")
    if not plain or plain[-1:] != b"\x01":
        raise ModelError(
            "uAI_model payload did not decrypt to a marked torch file (wrong key or cipher mode?)",
            code="checkpoint_decrypt_failed",
        )
    return plain[:-1]


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Remove the DataParallel prefix when every key has it; leave other dicts unchanged."""
    keys = list(state_dict)
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    if any(k.startswith(prefix) for k in keys):
        raise ModelError(
            f"state_dict mixes keys with and without the '{prefix}' prefix", code="checkpoint_keys_inconsistent"
        )
    return dict(state_dict)


def _triple(value: Any, name: str, kind: type) -> tuple[Any, Any, Any]:
    try:
        items = tuple(kind(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"checkpoint field '{name}' is not a list of numbers: {value!r}", code="checkpoint_metadata") from exc
    if len(items) != 3:
        raise ModelError(f"checkpoint field '{name}' must have 3 values (x, y, z), got {value!r}", code="checkpoint_metadata")
    return items


def parse_preprocessing(state: Mapping[str, Any]) -> Preprocessing:
    """Validate and type the preprocessing fields of a checkpoint dict (§12)."""
    missing = [
        k
        for k in ("spacing", "crop_size", "crop_normalizers", "interpolation", "input_channel", "lesion_idx")
        if k not in state
    ]
    if missing:
        raise ModelError(f"checkpoint lacks preprocessing fields {missing}", code="checkpoint_metadata")
    spacing = _triple(state["spacing"], "spacing", float)
    crop_size = _triple(state["crop_size"], "crop_size", int)
    max_stride = int(state.get("max_stride", 16))
    if any(s <= 0 for s in spacing):
        raise ModelError(f"crop spacing must be positive, got {spacing}", code="checkpoint_metadata")
    if any(c <= 0 or c % max_stride for c in crop_size):
        raise ModelError(
            f"crop_size {crop_size} must be positive multiples of max_stride {max_stride}", code="checkpoint_metadata"
        )
    channels = int(state["input_channel"])
    normalizers: list[Normalizer] = []
    for i, spec in enumerate(state["crop_normalizers"]):
        if not isinstance(spec, Mapping):
            raise ModelError(f"crop_normalizers[{i}] is not a dict", code="checkpoint_metadata")
        if spec.get("type") != 0:
            raise ModelError(
                f"crop_normalizers[{i}] has unsupported type {spec.get('type')!r} (only fixed type 0 exists in HCL-AL)",
                code="checkpoint_normalizer_unsupported",
            )
        std = float(spec["stddev"])
        if std <= 0:
            raise ModelError(f"crop_normalizers[{i}] stddev must be positive", code="checkpoint_metadata")
        normalizers.append(Normalizer(mean=float(spec["mean"]), stddev=std, clip=bool(spec["clip"])))
    interpolation = tuple(str(m).lower() for m in state["interpolation"])
    bad = [m for m in interpolation if m not in INTERPOLATIONS]
    if bad:
        raise ModelError(f"unknown interpolation {bad}; expected {INTERPOLATIONS}", code="checkpoint_metadata")
    lesion_idx = tuple(int(i) for i in state["lesion_idx"])
    if len(normalizers) != channels or len(interpolation) != channels:
        raise ModelError(
            f"input_channel={channels} but {len(normalizers)} normalizers and {len(interpolation)} interpolations",
            code="checkpoint_metadata",
        )
    if any(not 0 <= i < channels for i in lesion_idx):
        raise ModelError(f"lesion_idx {lesion_idx} outside 0..{channels - 1}", code="checkpoint_metadata")
    sample_method = str(state.get("sample_method", "fixed_length"))
    if sample_method != "fixed_length":
        raise ModelError(
            f"sample_method {sample_method!r} is not implemented (HCL-AL only implements 'fixed_length')",
            code="checkpoint_metadata",
        )
    return Preprocessing(
        spacing=spacing,
        crop_size=crop_size,
        normalizers=tuple(normalizers),
        interpolation=interpolation,
        input_channel=channels,
        lesion_idx=lesion_idx,
        max_stride=max_stride,
        sample_method=sample_method,
    )


def load_torch_payload(payload: bytes) -> Any:
    """``torch.load`` restricted to tensors and plain containers, mapped to CPU."""
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ModelError(
            f"checkpoint is not a loadable weights-only torch file: {type(exc).__name__}: {str(exc)[:300]}",
            code="checkpoint_unreadable",
        ) from exc


def load_checkpoint(path: str | Path, *, key: bytes = UAI_DEFAULT_KEY) -> HclalCheckpoint:
    """Read, decrypt if tagged, and validate one HCL-AL ``params.pth``.

    The returned ``state_dict`` has the ``module.`` prefix removed; building and strictly
    loading the network is :func:`pipelines.models.localizer.network.build_network`'s job.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "params.pth"
    if not p.is_file():
        raise ModelError(f"checkpoint not found: {p}", code="checkpoint_missing")
    data = p.read_bytes()
    digest = sha256_bytes(data)
    encrypted = is_encrypted(data)
    payload = decrypt_uai(data, key) if encrypted else data
    state = load_torch_payload(payload)
    if not isinstance(state, Mapping) or "state_dict" not in state or "net" not in state:
        raise ModelError(f"{p.name} is not an HCL-AL checkpoint dict (needs 'net' and 'state_dict')", code="checkpoint_layout")
    sd = state["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError("checkpoint 'state_dict' is not a mapping of tensors", code="checkpoint_layout")
    # Locus-trained demo checkpoints may store floating tensors in float16 to stay small
    # (metadata ``locus.stored_dtype``); the networks run in float32, so cast here, once.
    sd = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in sd.items()}
    known = {
        "net", "state_dict", "spacing", "crop_size", "crop_normalizers", "interpolation", "input_channel",
        "lesion_idx", "max_stride", "sample_method", "epoch", "batch",
    }  # fmt: skip
    extra = {k: v for k, v in state.items() if k not in known}
    stripped = strip_module_prefix(sd)
    ckpt = HclalCheckpoint(
        path=str(p),
        sha256=digest,
        encrypted=encrypted,
        net=str(state["net"]),
        preprocessing=parse_preprocessing(state),
        state_dict=stripped,
        epoch=int(state["epoch"]) if state.get("epoch") is not None else None,
        batch=int(state["batch"]) if state.get("batch") is not None else None,
        extra=extra,
        content_sha256=state_dict_sha256(stripped),
    )
    log.info(
        "loaded HCL-AL checkpoint %s net=%s sha256=%s encrypted=%s crop=%s spacing=%s",
        p.name, ckpt.net, digest[:12], encrypted, ckpt.preprocessing.crop_size, ckpt.preprocessing.spacing,
    )  # fmt: skip
    return ckpt
