"""Reading AFLoc's PyTorch-Lightning 1.1.4 ``.ckpt`` without executing pickled code (AFLoc, YH0517/AFLoc).

The published checkpoints cannot be read with ``torch.load(weights_only=True)``: the pickle
uses the ``ModelCheckpoint`` class as a dict key and an OmegaConf ``DictConfig`` as
``hyper_parameters`` (Lightning 1.1.4 ``checkpoint_connector.py``).  A full unpickle would run whatever the file names, so
this module implements a restricted reader:

* the torch zip is opened directly; the single ``<prefix>/data.pkl`` is unpickled by
  :class:`RestrictedUnpickler`, whose ``find_class`` resolves **only** tensor rebuilding
  (implemented here, never torch's own), storage type names (mapped to dtypes),
  ``collections.OrderedDict`` and plain builtin types;
* the globals a Lightning/OmegaConf envelope is known to reference become inert
  :class:`Placeholder` classes that only record arguments, state and items — nothing of
  theirs is ever called;
* **any other global refuses the file**, naming it (``os.system``, ``builtins.eval`` …), so a
  checkpoint needing anything else is rejected with the reason and nothing executes;
* ``persistent_load`` reads ``<prefix>/data/<key>`` bytes as a flat tensor of the storage
  dtype, and tensors are ``as_strided`` views copied out.

Then ``afloc.`` is stripped (text after the last occurrence, as ``builder.py:23-27``),
``text_encoder.model.embeddings.position_ids`` dropped after checking it is 0…N−1 (current transformers no longer store it),
optimizer / scheduler / AMP / callback entries ignored, and the weights loaded strictly.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.errors import ModelError
from pipelines.models.checkpoints import sha256_file

log = logging.getLogger(__name__)

PREFIX = "afloc."
POSITION_IDS = "text_encoder.model.embeddings.position_ids"

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_BUILTINS = {
    "int": int, "long": int, "float": float, "str": str, "unicode": str, "bool": bool,
    "list": list, "dict": dict, "tuple": tuple, "set": set, "frozenset": frozenset, "complex": complex,
}  # fmt: skip
#: Envelope globals that are turned into inert placeholders; anything else refuses the file.
_PLACEHOLDER_MODULE_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.")
_PLACEHOLDER_GLOBALS = {
    ("typing", "Any"),
    ("collections", "defaultdict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("torch", "device"),
}


class Placeholder:
    """Inert stand-in for a global the envelope references: records, never runs anything."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None
        self.items: dict[Any, Any] = {}
        self.list_items: list[Any] = []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        """Collect list items a pickled envelope appends, so the config can be recovered as plain data."""
        self.list_items.append(value)

    def extend(self, values: Any) -> None:
        """Collect list items a pickled envelope extends with (the ``APPENDS`` opcode), as data only."""
        self.list_items.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder {self.qualname}>"


def _placeholder_class(module: str, name: str) -> type[Placeholder]:
    return type(f"Placeholder[{module}.{name}]", (Placeholder,), {"qualname": f"{module}.{name}"})


@dataclass(frozen=True)
class _Storage:
    flat: torch.Tensor


class RestrictedUnpickler(pickle.Unpickler):
    """The allow-list unpickler over one torch zip archive (no pickled code ever runs)."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._placeholders: dict[tuple[str, str], type[Placeholder]] = {}
        self.used_placeholders: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only allow-listed globals; anything that could run code refuses the file."""
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return _BUILTINS[name]
        if module.startswith(_PLACEHOLDER_MODULE_PREFIXES) or (module, name) in _PLACEHOLDER_GLOBALS:
            key = (module, name)
            if key not in self._placeholders:
                self._placeholders[key] = _placeholder_class(module, name)
            self.used_placeholders.add(f"{module}.{name}")
            return self._placeholders[key]
        raise ModelError(
            f"checkpoint refused: its pickle needs the global {module}.{name}, which the restricted AFLoc reader "
            "does not allow (only tensors, plain containers and the Lightning/OmegaConf envelope are read)",
            code="checkpoint_unsafe",
        )

    def persistent_load(self, pid: Any) -> Any:
        """Read a tensor storage from the archive by its key, checking its size, without trusting the pickle."""
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise ModelError(f"checkpoint refused: unexpected persistent id {str(pid)[:80]}", code="checkpoint_unsafe")
        dtype, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(dtype, torch.dtype):
            raise ModelError(f"checkpoint refused: storage of unknown type {dtype!r}", code="checkpoint_unsafe")
        try:
            raw = self._archive.read(f"{self._prefix}data/{key}")
        except KeyError as exc:
            raise ModelError(f"checkpoint is truncated: storage {key} missing", code="checkpoint_corrupt") from exc
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * itemsize:
            raise ModelError(f"checkpoint storage {key} has {len(raw)} bytes, expected {numel * itemsize}",
                             code="checkpoint_corrupt")  # fmt: skip
        flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return _Storage(flat)


def _rebuild_tensor_v2(storage: Any, offset: int, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:  # fmt: skip
    """``as_strided`` view of the flat storage, copied (never torch's own rebuild function)."""
    if not isinstance(storage, _Storage):
        raise ModelError("checkpoint refused: a tensor is rebuilt from something other than a storage",
                         code="checkpoint_unsafe")  # fmt: skip
    size_t, stride_t = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    need = int(offset) + sum((s - 1) * st for s, st in zip(size_t, stride_t) if s > 0) + 1
    if any(s == 0 for s in size_t):
        return torch.empty(size_t, dtype=storage.flat.dtype)
    if need > storage.flat.numel():
        raise ModelError("checkpoint tensor points outside its storage", code="checkpoint_corrupt")
    return torch.as_strided(storage.flat, size_t, stride_t, int(offset)).clone()


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise ModelError("checkpoint refused: a parameter wraps a non-tensor", code="checkpoint_unsafe")
    return data


def _plain(obj: Any, depth: int = 0) -> Any:
    """Recover plain Python from placeholder-wrapped OmegaConf nodes: ``_content`` / ``_val``."""
    if depth > 64:
        return None
    if isinstance(obj, Placeholder):
        state = obj.state
        if isinstance(state, Mapping):
            if "_content" in state:
                return _plain(state["_content"], depth + 1)
            if "_val" in state:
                return _plain(state["_val"], depth + 1)
            return {str(k): _plain(v, depth + 1) for k, v in state.items() if not str(k).startswith("_")}
        if obj.items:
            return {str(k): _plain(v, depth + 1) for k, v in obj.items.items()}
        if obj.list_items:
            return [_plain(v, depth + 1) for v in obj.list_items]
        return None
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist() if obj.numel() <= 16 else f"<tensor {tuple(obj.shape)}>"
    if obj is None or isinstance(obj, (int, float, str, bool)):
        return obj
    return repr(obj)[:80]


@dataclass(frozen=True)
class AflocCheckpoint:
    """The weights of one AFLoc ``.ckpt`` (``afloc.`` stripped), its sha256 and recovered metadata."""

    path: str
    sha256: str
    state_dict: dict[str, torch.Tensor]
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    lightning_version: str = ""
    epoch: int | None = None
    global_step: int | None = None
    adjustments: tuple[str, ...] = ()
    ignored_entries: tuple[str, ...] = ()
    placeholders: tuple[str, ...] = ()

    @property
    def word_num(self) -> int | None:
        """``data.text.word_num`` from the recovered config, if present (the code requires 97)."""
        try:
            return int(self.hyper_parameters["data"]["text"]["word_num"])
        except (KeyError, TypeError, ValueError):
            return None


def read_pickle_archive(source: bytes | str | Path) -> tuple[Any, set[str]]:
    """Unpickle the torch zip (bytes or a path) with :class:`RestrictedUnpickler`; (object, placeholder globals).

    A path is read member by member (the file is not loaded whole: real checkpoints carry about
    twice their weights in optimizer state).
    """
    handle: Any = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    if not zipfile.is_zipfile(handle):
        raise ModelError("checkpoint refused: not a torch zip archive (the legacy pickle-only format is not read)",
                         code="checkpoint_unreadable")  # fmt: skip
    if isinstance(handle, io.BytesIO):
        handle.seek(0)
    with zipfile.ZipFile(handle) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ModelError(f"checkpoint refused: expected one */data.pkl, found {len(pkls)}", code="checkpoint_unreadable")
        prefix = pkls[0][: -len("data.pkl")]
        order = archive.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in archive.namelist() else "little"
        if order.strip() != "little":
            raise ModelError(f"checkpoint byte order {order!r} is not supported", code="checkpoint_unreadable")
        unpickler = RestrictedUnpickler(archive.read(pkls[0]), archive, prefix)
        try:
            obj = unpickler.load()
        except ModelError:
            raise
        except Exception as exc:  # malformed pickle streams raise many types
            raise ModelError(f"checkpoint pickle is malformed: {type(exc).__name__}: {str(exc)[:200]}",
                             code="checkpoint_corrupt") from exc  # fmt: skip
    return obj, unpickler.used_placeholders


def rename_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """``afloc.`` renaming (text after its last occurrence) and the ``position_ids`` check/drop (current transformers)."""
    out: dict[str, torch.Tensor] = {}
    adjustments: list[str] = []
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ModelError(f"checkpoint refused: state_dict entry {str(key)[:60]!r} is not a tensor",
                             code="checkpoint_layout")  # fmt: skip
        if PREFIX not in key:
            raise ModelError(f"checkpoint key {key!r} lacks the '{PREFIX}' prefix of the published layout",
                             code="checkpoint_layout")  # fmt: skip
        new = key[key.rindex(PREFIX) + len(PREFIX) :]
        if new in out:
            raise ModelError(f"checkpoint keys collide after renaming: {new!r}", code="checkpoint_layout")
        out[new] = value
    if POSITION_IDS in out:
        ids = out.pop(POSITION_IDS)
        expected = torch.arange(ids.shape[-1]).reshape(ids.shape) if ids.numel() else ids
        if ids.dtype not in (torch.int64, torch.int32) or not torch.equal(ids.long(), expected.long()):
            raise ModelError("checkpoint position_ids are not 0…N−1; refusing to drop them silently",
                             code="checkpoint_layout")  # fmt: skip
        adjustments.append(f"dropped {POSITION_IDS} (0…{ids.shape[-1] - 1}, non-persistent in current transformers)")
    return out, tuple(adjustments)


def read_checkpoint(path: str | Path, *, expected_sha256: str = "") -> AflocCheckpoint:
    """Read a published-layout AFLoc ``.ckpt`` safely; refuses (``ModelError``) anything else, with the reason."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"AFLoc checkpoint not found: {p.name}", code="checkpoint_missing")
    digest = sha256_file(p)
    if expected_sha256 and digest != expected_sha256:
        raise ModelError(f"AFLoc checkpoint sha256 {digest[:16]}… differs from the pinned {expected_sha256[:16]}…",
                         code="model_hash_mismatch")  # fmt: skip
    obj, placeholders = read_pickle_archive(p)
    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        raise ModelError("checkpoint refused: not a Lightning checkpoint dict with a 'state_dict'", code="checkpoint_layout")
    sd = obj["state_dict"]
    if not isinstance(sd, Mapping) or not sd:
        raise ModelError("checkpoint refused: 'state_dict' is not a mapping of tensors", code="checkpoint_layout")
    state_dict, adjustments = rename_state_dict(sd)
    hp = _plain(obj.get("hyper_parameters"))
    ignored = tuple(sorted(str(k) for k in obj if k not in ("state_dict", "hyper_parameters")))
    ckpt = AflocCheckpoint(
        path=str(p),
        sha256=digest,
        state_dict=state_dict,
        hyper_parameters=hp if isinstance(hp, dict) else {},
        lightning_version=str(obj.get("pytorch-lightning_version", "")),
        epoch=int(obj["epoch"]) if isinstance(obj.get("epoch"), int) else None,
        global_step=int(obj["global_step"]) if isinstance(obj.get("global_step"), int) else None,
        adjustments=adjustments,
        ignored_entries=ignored,
        placeholders=tuple(sorted(placeholders)),
    )
    if ckpt.word_num is not None and ckpt.word_num != 97:
        raise ModelError(f"checkpoint config has data.text.word_num={ckpt.word_num}; the published path uses 97",
                         code="checkpoint_config")  # fmt: skip
    return ckpt


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Strict load; a mismatch is a :class:`ModelError` naming the missing/unexpected/reshaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    dtypes = sorted(k for k in set(own) & set(state_dict) if own[k].is_floating_point() != state_dict[k].is_floating_point())
    if missing or unexpected or shapes or dtypes:
        raise ModelError(
            f"checkpoint does not match the AFLoc layout: {len(missing)} missing {missing[:5]}, {len(unexpected)} "
            f"unexpected {unexpected[:5]}, {len(shapes)} with other shapes {shapes[:5]}, {len(dtypes)} of another kind {dtypes[:3]}",
            code="checkpoint_layout",
        )
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() and own[k].dtype == torch.float32 else v for k, v in state_dict.items()},
        strict=True,
    )


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over sorted key names, dtypes, shapes and bytes (identifies weights independently of the envelope)."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().contiguous().cpu()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
