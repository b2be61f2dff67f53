"""The authoring aid finds codes only inside DICOM context groups."""

from library.tools.find_code import find


def test_find_code_in_cid() -> None:
    rows = find(r"^L3 vertebra$", cid=7603)
    assert rows == [("SCT", "36470004", "L3 vertebra", rows[0][3])] and 7603 in rows[0][3]
    assert find("no such anatomy xyz") == []
