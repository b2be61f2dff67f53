"""Deterministic UIDs for Locus results.

Why deterministic: a worker may run twice on the same study version (a retry after a
crash, a re-send after a PACS outage).  The PACS must then receive the *same* SR
object, not a duplicate with a fresh UID; and when the result changes (new model,
corrected measurement), the SR must get a new UID so the old one is never silently
overwritten (PS3.3 C.12.1.1.1: a SOP Instance UID identifies one unchanging object).

Scheme (PS3.5 section 9.1 and Annex B.2, "UUID derived UID"): by default
``2.25.<integer of a name-based UUID>``, where the UUID is RFC 9562 version 5
(SHA-1, name-based) in the Locus namespace :data:`LOCUS_UID_NAMESPACE` over a
canonical, ``|``-separated string of the UID's purpose and its inputs.  When an
organisation root is configured (``prefix``), :func:`pydicom.uid.generate_uid` is used
instead with the same canonical string as its only entropy source, so the result is
still a pure function of the inputs.

What is hashed for a report (:func:`content_digest`): the canonical JSON of every
input that shapes the SR content (findings dataclasses, model identities, device,
evidence UIDs), see :func:`canonical_json`.  Floats are written with ``repr`` (exact,
platform-independent since Python 3.1), so any change of a reported value changes
the UID; a UID is never reused for different content.

Device Observer UID: IHE AI Results (AIR) asks that the device UID change whenever the
algorithm or its model changes, so it is derived from the device name and version and
the sha256 of every contributing model's weights (:func:`device_uid`).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from pydicom.uid import UID, generate_uid

from pipelines.dicom import uid as _uid
from pipelines.findings import ModelInfo

LOCUS_UID_NAMESPACE = uuid.UUID("5a0c1f7e-8c55-5d53-9b7e-6c6f63757331")
"""Fixed namespace UUID for Locus name-based UUIDs (never change: it would change every UID)."""

_SEPARATOR = "|"


def _canonical(value: Any) -> Any:
    """JSON-ready, order-independent representation of findings values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return _canonical(value.value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return {"non_finite": repr(value)}
        # repr is the shortest string that round-trips: exact and reproducible.
        return {"float": repr(value)}
    raise TypeError(f"cannot canonicalise value of type {type(value).__name__}")


def is_valid_uid(value: str) -> bool:
    """Whether a UID Locus writes is valid: :func:`pipelines.dicom.uid.is_valid_uid`, strict."""
    return _uid.is_valid_uid(value)


def canonical_json(value: Any) -> str:
    """Canonical JSON of findings values: sorted keys, no whitespace, exact floats.

    Dataclasses (e.g. :class:`pipelines.findings.Lesion`) become objects of their
    fields, enums their values, tuples lists; floats are tagged ``{"float": repr}`` so
    that ``1`` and ``1.0`` differ and no precision is lost.
    """
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_digest(value: Any) -> str:
    """SHA-256 (hex) of :func:`canonical_json` of ``value``."""
    return hashlib.sha256(canonical_json(value).encode("ascii")).hexdigest()


def derived_uid(purpose: str, *parts: str, prefix: str | None = None) -> UID:
    """A UID that is a pure function of ``purpose`` and ``parts``.

    ``prefix`` None gives ``2.25.`` + the integer of a version-5 UUID (PS3.5 B.2);
    otherwise ``generate_uid(prefix, [canonical string])`` (at most 64 characters).
    """
    for part in (purpose, *parts):
        if not isinstance(part, str):
            raise TypeError(f"UID inputs must be strings, got {type(part).__name__}")
        if _SEPARATOR in part:
            # Keep the canonical string unambiguous ("a|b","c" vs "a","b|c").
            raise ValueError(f"UID input {part!r} must not contain {_SEPARATOR!r}")
    name = _SEPARATOR.join(("locus", purpose, *parts))
    if prefix is None:
        return UID(f"2.25.{uuid.uuid5(LOCUS_UID_NAMESPACE, name).int}")
    return generate_uid(prefix=prefix, entropy_srcs=[name])


def sr_series_instance_uid(
    study_instance_uid: str, study_version: int, digest: str, *, prefix: str | None = None
) -> UID:
    """Series Instance UID of the SR for one study version and one result digest."""
    return derived_uid("sr-series", study_instance_uid, str(int(study_version)), digest, prefix=prefix)


def sr_sop_instance_uid(
    study_instance_uid: str, study_version: int, digest: str, *, prefix: str | None = None
) -> UID:
    """SOP Instance UID of the SR for one study version and one result digest."""
    return derived_uid("sr-instance", study_instance_uid, str(int(study_version)), digest, prefix=prefix)


def device_uid(
    device_name: str,
    device_version: str,
    models: Iterable[ModelInfo],
    *,
    prefix: str | None = None,
) -> UID:
    """Device Observer UID (TID 1004) that changes whenever a contributing model changes.

    Derived from the device name and version and the sorted, de-duplicated weights
    hashes (and library hashes) of ``models`` (IHE AIR, "Device Observer UID").
    """
    fingerprints = sorted(
        {f"{m.model_id}={m.sha256}" + (f"+{m.library_hash}" if m.library_hash else "") for m in models}
    )
    return derived_uid("device", device_name, device_version, ",".join(fingerprints), prefix=prefix)


def lesion_tracking_uid(
    seg_sop_instance_uid: str,
    segment_number: int,
    component: int | None = None,
    *,
    prefix: str | None = None,
) -> UID:
    """Tracking Unique Identifier (DCM 112040) for a lesion whose SEG segment has none.

    Stable across study versions as long as the same SEG instance, segment and
    connected component describe the lesion.
    """
    return derived_uid(
        "lesion-tracking",
        seg_sop_instance_uid,
        str(int(segment_number)),
        "" if component is None else str(int(component)),
        prefix=prefix,
    )


def study_findings_tracking_uid(
    study_instance_uid: str, model: ModelInfo, *, prefix: str | None = None
) -> UID:
    """Tracking UID of the study-level zero-shot findings group (one per study and model)."""
    return derived_uid("study-findings", study_instance_uid, model.model_id, model.sha256, prefix=prefix)


def study_notes_tracking_uid(study_instance_uid: str, *, prefix: str | None = None) -> UID:
    """Tracking UID of the study-level processing-notes group."""
    return derived_uid("study-notes", study_instance_uid, prefix=prefix)
