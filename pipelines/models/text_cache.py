"""On-disk cache of candidate-text features, so a localizer starts in seconds, not a minute.

Why: HCL-AL scores every lesion against fixed candidate texts (124 coarse and 203 fine
descriptions, as the HCL-AL reference code does).  Encoding them through two 63 M-parameter CLIP
text towers dominates the start-up of a full-size localizer on a CPU host, yet the result
only changes when the tower weights or the texts change.  The reference code re-encodes
them per lesion (bug B14); Locus encodes them once per process and, with this cache, once
per (tower, texts) pair.

Safety and exactness:

* No pickle: an entry is a ``.npz`` of two plain numeric arrays (``features`` float32
  ``[N, D]`` and ``token_ids`` int64 ``[N, context]``, read with ``allow_pickle=False``) plus
  a ``.json`` key.
* The key holds the canonical hash of the tower's weights content
  (:func:`~pipelines.models.checkpoints.state_dict_sha256`, the optional extra projection
  included; for a tower loaded strictly from a checkpoint, the checkpoint's weights-content
  hash instead, see :func:`checkpoint_tower_hash`), the hash of the exact token ids, the device type and torch version that
  computed the features (so cached values are the bytes a fresh encoding on this kind of
  device gives) and the hash of the stored features.  All are verified on load; an entry
  that does not match (stale, truncated, edited) is rebuilt.
* A cache directory that cannot be written is not an error: the features are used from
  memory and the failure is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.models.checkpoints import state_dict_sha256
from pipelines.models.text import encode_texts

log = logging.getLogger(__name__)

#: Version of the entry layout; part of every key.
CACHE_FORMAT = "locus-text-features-v1"


def tower_sha256(tower: nn.Module, post: nn.Module | None = None) -> str:
    """Weights-content hash of a text tower and its optional extra projection (``text_fc``)."""
    sd = {f"tower.{k}": v for k, v in tower.state_dict().items()}
    if post is not None:
        sd.update({f"post.{k}": v for k, v in post.state_dict().items()})
    return state_dict_sha256(sd)


def checkpoint_tower_hash(content_sha256: str) -> str:
    """Cache-key tower identity of a text tower loaded strictly from a checkpoint.

    Why: the tower (and ``text_fc``) of an HCL-AL network is built from, and strictly
    loaded with, that checkpoint's tensors, so the checkpoint's weights-content hash
    (:func:`~pipelines.models.checkpoints.state_dict_sha256` of the whole state dict, computed
    once by ``load_checkpoint``) determines the tower's weights.  Using it saves hashing the
    ~250 MB of tower weights a second time on every start; any change to any tensor of the
    checkpoint changes it, so a stale entry is still detected.
    """
    if len(content_sha256) != 64:
        raise ValueError("checkpoint_tower_hash needs a 64-hex-digit weights-content hash")
    return f"checkpoint-content:{content_sha256}"


def _array_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


@dataclass(frozen=True)
class CacheOutcome:
    """What :meth:`TextFeatureCache.features` did (for logs and tests)."""

    hit: bool
    path: Path
    reason: str  # "hit", "absent", "stale: …", "unreadable: …"


class TextFeatureCache:
    """A directory of verified text-feature entries (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.last: CacheOutcome | None = None

    def key(self, tower_hash: str, tokens: torch.Tensor, device_type: str) -> dict[str, str]:
        """The full key of an entry: everything that determines the features' bytes."""
        ids = tokens.detach().to("cpu", torch.int64).numpy()
        return {
            "format": CACHE_FORMAT,
            "tower_sha256": tower_hash,
            "token_ids_sha256": _array_sha256(ids) + f":{ids.shape[0]}x{ids.shape[1]}",
            "device_type": device_type,
            "torch": torch.__version__,
        }

    def _paths(self, key: dict[str, str]) -> tuple[Path, Path]:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.directory / f"{name}.npz", self.directory / f"{name}.json"

    def features(
        self,
        tower: nn.Module,
        tokens: torch.Tensor,
        *,
        post: nn.Module | None = None,
        tower_hash: str | None = None,
        what: str = "texts",
        progress: Callable[[str], None] | None = None,
    ) -> torch.Tensor:
        """L2-normalised fp32 features ``[N, D]`` on the tower's device: cached, or encoded and cached.

        Equal, bit for bit, to ``encode_texts(tower, tokens, post=post)`` on this device type.
        ``tower_hash``, when given, must identify the weights of ``tower`` and ``post``
        exactly (the localizer passes :func:`checkpoint_tower_hash` of the checkpoint the
        tower was loaded from); otherwise :func:`tower_sha256` hashes the modules' tensors.
        """
        device = next(tower.parameters()).device
        key = self.key(tower_hash or tower_sha256(tower, post), tokens, device.type)
        npz, meta = self._paths(key)
        cached, reason = self._read(npz, meta, key, tokens)
        if cached is not None:
            self.last = CacheOutcome(True, npz, "hit")
            log.info("text features of %s read from the cache (%s)", what, npz.name)
            return torch.from_numpy(cached).to(device)
        say = f"encoding {what} (one-time; text-feature cache {reason}, will be kept in {self.directory})"
        log.info(say)
        if progress is not None:
            progress(say)
        emb = encode_texts(tower, tokens, post=post)
        self._write(npz, meta, key, tokens, emb.detach().to("cpu", torch.float32).numpy())
        self.last = CacheOutcome(False, npz, reason)
        return emb

    def _read(self, npz: Path, meta: Path, key: dict[str, str],
              tokens: torch.Tensor) -> tuple[np.ndarray | None, str]:  # fmt: skip
        if not npz.is_file() or not meta.is_file():
            return None, "absent"
        try:
            stored = json.loads(meta.read_text(encoding="utf-8"))
            with np.load(npz, allow_pickle=False) as data:
                feats = np.array(data["features"])
                ids = np.array(data["token_ids"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            log.warning("text-feature cache entry %s unreadable (%s); rebuilding", npz.name, exc)
            return None, f"unreadable ({type(exc).__name__})"
        if {k: stored.get(k) for k in key} != key:
            return None, "stale (key differs)"
        if ids.dtype != np.int64 or not np.array_equal(ids, tokens.detach().to("cpu", torch.int64).numpy()):
            return None, "stale (token ids differ)"
        if feats.dtype != np.float32 or feats.ndim != 2 or feats.shape[0] != ids.shape[0]:
            return None, "stale (features malformed)"
        if stored.get("features_sha256") != _array_sha256(feats):
            log.warning("text-feature cache entry %s fails its checksum; rebuilding", npz.name)
            return None, "stale (checksum)"
        return feats, "hit"

    def _write(self, npz: Path, meta: Path, key: dict[str, str], tokens: torch.Tensor, feats: np.ndarray) -> None:
        ids = tokens.detach().to("cpu", torch.int64).numpy()
        record = {**key, "features_sha256": _array_sha256(feats), "shape": list(feats.shape)}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for target, write in ((npz, lambda fh: np.savez(fh, features=feats, token_ids=ids)),
                                  (meta, lambda fh: fh.write(json.dumps(record, indent=1).encode()))):  # fmt: skip
                fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=target.suffix)
                try:
                    with os.fdopen(fd, "wb") as fh:
                        write(fh)
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.replace(tmp, target)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        except OSError as exc:
            log.warning("text-feature cache %s not written (%s); features kept in memory only", self.directory, exc)
