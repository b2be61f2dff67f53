"""The one UID validator (pipelines.dicom.uid): PS3.5 §9.1 via pydicom's rule, exact strings only."""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from node import storage
from pipelines.dicom.uid import UID_MAX_LENGTH, InvalidUidError, is_valid_uid, validate_uid
from pipelines.sr import uids as sr_uids

VALID = ["0", "1.2.3", "1.2.840.10008.5.1.4.1.1.66.7", "1." + "2" * 62, "2.25.0"]
INVALID = ["", " ", "1.2.", ".1.2", "1..2", "../../etc", "1.2/3", "1.2.3\x00", "1.2.3 ", " 1.2.3", "1.2.3\n",
           "a.b", "1." + "2" * 63, None, 123, b"1.2.3"]


@pytest.mark.parametrize("uid", VALID)
def test_valid_uids_agree_with_pydicom(uid: str) -> None:
    assert is_valid_uid(uid) and UID(uid).is_valid
    assert validate_uid(uid, "X") == uid
    assert storage.is_valid_uid(uid) and sr_uids.is_valid_uid(uid)


@pytest.mark.parametrize("uid", INVALID)
def test_invalid_uids_are_refused_everywhere(uid: object) -> None:
    assert not is_valid_uid(uid)
    assert not is_valid_uid(uid, allow_leading_zeros=True)
    assert not storage.is_valid_uid(uid)
    with pytest.raises(InvalidUidError) as info:
        validate_uid(uid, "SOPInstanceUID")
    assert "SOPInstanceUID" in info.value.reason and info.value.code == "invalid_uid"


def test_pydicom_alone_would_accept_padding_the_node_refuses() -> None:
    # UID.is_valid strips first; a padded value is not a safe path component, so it is refused here.
    assert UID(" 1.2.3").is_valid
    assert not is_valid_uid(" 1.2.3")


def test_leading_zeros_only_for_received_uids() -> None:
    received = "1.2.840.113619.2.55.3.01"
    assert not is_valid_uid(received) and not sr_uids.is_valid_uid(received)  # never in a UID Locus writes
    assert is_valid_uid(received, allow_leading_zeros=True) and storage.is_valid_uid(received)  # filed as sent
    assert len("1." + "2" * 62) == UID_MAX_LENGTH
