"""Validators every written DICOM object goes through in tests (PS3.3 IOD rules checked by
dciodvfy and highdicom).

Besides dciodvfy, every SR is scanned for server paths: reports go to the PACS and name
instances by UID only, so no text value may hold a file-system path.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from tests.conftest import dciodvfy_path

#: Value representations that hold free text or names (PS3.5 Table 6.2-1).
TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
#: Leading/trailing characters that wrap a path in prose: quotes, brackets, punctuation.
_WRAP = "\"'`()[]{}<>,;:"
_WINDOWS_DRIVE = re.compile(r"(^|[^A-Za-z0-9])[A-Za-z]:[\\/]")


def text_values(ds: Dataset) -> Iterator[tuple[str, str]]:
    """Every (keyword, text) of ``ds``, nested sequences included (content tree, evidence...)."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from text_values(item)
        elif elem.VR in TEXT_VRS and elem.value not in (None, ""):
            values = elem.value if isinstance(elem.value, (list, tuple, pydicom.multival.MultiValue)) else [elem.value]
            for v in values:
                yield elem.keyword or str(elem.tag), str(v)


def path_like(text: str) -> list[str]:
    """The tokens of ``text`` that look like a file-system path.

    A path here is: any backslash (no legitimate report text uses one; Windows paths and UNC
    shares do), a drive letter (``C:/``), a token starting with ``/``, ``~/``, ``./`` or
    ``../`` that has a second separator or a file suffix, or any token with a separator that
    ends in ``.dcm``.  UCUM units (``g/ml{SUVbw}``, ``Bq/ml``, ``cm2/ml{SUVbsa}``), ratios
    and URLs (``scheme://``) are not paths.
    """
    found: list[str] = []
    if _WINDOWS_DRIVE.search(text):
        found.append(text)
    for raw in text.split():
        token = raw.strip(_WRAP).rstrip(".")
        if not token or "://" in token:
            continue
        if "\\" in token or (token.startswith(("/", "~/", "./", "../")) and (
            token.count("/") >= 2 or re.search(r"\.[A-Za-z0-9]{1,5}$", token)
        )) or ("/" in token and token.lower().endswith(".dcm")):
            found.append(token)
    return found


def assert_no_server_paths(ds: Dataset | Path | str) -> None:
    """Fail when any text value of ``ds`` (an SR, usually) holds a path-like string."""
    if not isinstance(ds, Dataset):
        ds = pydicom.dcmread(str(ds))
    hits = [(kw, text, path_like(text)) for kw, text in text_values(ds)]
    hits = [h for h in hits if h[2]]
    assert not hits, "server paths in a report (reports name instances by UID only):\n" + "\n".join(
        f"  {kw}: {text!r} -> {paths}" for kw, text, paths in hits
    )


def assert_dciodvfy_clean(path: Path | str) -> str:
    """Run dciodvfy; fail on any 'Error' line. Returns the (warning-only) output.

    An SR is also scanned for server paths (:func:`assert_no_server_paths`): every SR the
    test suite writes goes through here, so no report path escapes the scan.
    """
    proc = subprocess.run([dciodvfy_path(), str(path)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert not errors and proc.returncode == 0, f"dciodvfy reported errors for {path}:\n{out}"
    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    if str(ds.get("Modality", "")) == "SR":
        assert_no_server_paths(ds)
    return out
