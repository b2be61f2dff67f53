"""The one UID validator of Locus (received UIDs, UIDs it writes, UIDs used as spool paths).

PS3.5 §9.1: a UID is dot-separated numeric components, none with a leading zero (a
component may be the single digit 0), at most 64 characters (PS3.5 §6.2, VR UI). The
component rule is pydicom's (``pydicom.uid.RE_VALID_UID``, what ``UID.is_valid`` checks),
applied to the exact string: no padding, whitespace or trailing newline is accepted, so a
valid UID contains only digits and periods and is also a safe spool path component (the
node files instances under ``<study>/<series>/<sop>.dcm``).

Received UIDs are checked with ``allow_leading_zeros=True``: real devices emit components
such as ``01``, and refusing their instances would lose studies over a rule that does not
affect uniqueness; UIDs Locus writes (SR, device, tracking UIDs) are always strict.
"""

from __future__ import annotations

import re

from pydicom.uid import RE_VALID_UID

from pipelines.errors import InputError

UID_MAX_LENGTH = 64  # PS3.5 §6.2, VR UI
_LENIENT = re.compile(r"[0-9]+(\.[0-9]+)*")  # pydicom's rule without the leading-zero check


class InvalidUidError(InputError):
    """A UID that is not valid (PS3.5 §9.1), so it may be neither stored nor used as a path."""

    code = "invalid_uid"


def is_valid_uid(value: object, *, allow_leading_zeros: bool = False) -> bool:
    """Whether ``value`` is a string that is exactly a valid UID (see the module docstring)."""
    if not isinstance(value, str) or not 0 < len(value) <= UID_MAX_LENGTH:
        return False
    return (_LENIENT if allow_leading_zeros else RE_VALID_UID).fullmatch(value) is not None


def validate_uid(value: object, what: str, *, allow_leading_zeros: bool = False) -> str:
    """``value`` if it is a valid UID, else :class:`InvalidUidError` naming ``what`` (e.g. SOPInstanceUID)."""
    if not is_valid_uid(value, allow_leading_zeros=allow_leading_zeros):
        raise InvalidUidError(
            f"{what} {repr(value)[:80]} is not a valid DICOM UID (numeric components without leading zeros, "
            f"at most {UID_MAX_LENGTH} characters, PS3.5 §9.1)",
        )
    return str(value)
