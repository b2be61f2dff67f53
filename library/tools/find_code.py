"""Authoring aid: find candidate codes for a site in the DICOM context groups shipped with pydicom.

Usage: ``python -m library.tools.find_code "lymph node" [--cid 7600]``

Prints ``scheme value "meaning" CIDs`` for every concept whose meaning or keyword matches the
regular expression, restricted to context groups (codes that belong to no CID cannot be
recorded with a ``cid`` and are skipped).  Paste the chosen code into the region YAML as
``{scheme, value, meaning, cid}`` and run ``locus library check``.
"""

from __future__ import annotations

import argparse
import re
from typing import cast


def find(pattern: str, cid: int | None = None) -> list[tuple[str, str, str, list[int]]]:
    from pydicom.sr._concepts_dict import concepts as _concepts

    concepts = cast("dict[str, dict[str, dict[str, tuple[str, list[int]]]]]", _concepts)

    rx = re.compile(pattern, re.I)
    rows: dict[tuple[str, str, str], list[int]] = {}
    for scheme, by_keyword in concepts.items():
        for keyword, codes in by_keyword.items():
            for value, (meaning, cids) in codes.items():
                if not cids or (cid is not None and cid not in cids):
                    continue
                if rx.search(meaning) or rx.search(keyword):
                    rows.setdefault((scheme, value, meaning), []).extend(cids)
    return [(s, v, m, sorted(set(c))) for (s, v, m), c in sorted(rows.items(), key=lambda r: r[0][2].lower())]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pattern", help="regular expression matched against code meanings and keywords")
    parser.add_argument("--cid", type=int, default=None, help="only codes in this context group")
    args = parser.parse_args(argv)
    for scheme, value, meaning, cids in find(args.pattern, args.cid):
        print(f"{scheme:<6} {value:<12} {meaning!r:<60} CID {', '.join(map(str, cids))}")


if __name__ == "__main__":
    main()
