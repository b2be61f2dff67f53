"""The generated approximate-sites report is complete and committed up to date."""

from __future__ import annotations

from library.anatomy import load_library
from library.report import REPORT_PATH, approximate_sites_report


def test_report_lists_every_approximate_site_and_no_exact_one() -> None:
    lib = load_library()
    text = approximate_sites_report(lib)
    for site in lib.sites:
        assert (f"`{site.id}`" in text) == site.approximate, site.id
    assert lib.content_hash in text


def test_committed_report_is_current() -> None:
    assert REPORT_PATH.read_text(encoding="utf-8") == approximate_sites_report(load_library()), \
        "library/APPROXIMATE_SITES.md is stale: run `locus library report`"
