"""Locus anatomy knowledge: coded whole-body sites, their hierarchy and descriptions.

Data files live in ``library/data`` (YAML, one entry per site); this package only loads and
validates them and imports nothing else from Locus.  Main entry points::

    from library import load_library
    lib = load_library()
    site = lib.hclal_site("Liver S7")        # HCL-AL final string -> coded Locus site
    coding = site.to_assignment()           # plain data for pipelines.findings.SiteAssignment
"""

from library.anatomy import (
    AnatomyLibrary,
    Code,
    HclAlCrosswalk,
    Laterality,
    Site,
    SiteCoding,
    load_library,
)
from library.errors import LibraryError, LibraryHashMismatch
from library.versioning import check_library_hash

__all__ = [
    "AnatomyLibrary",
    "Code",
    "HclAlCrosswalk",
    "Laterality",
    "LibraryError",
    "LibraryHashMismatch",
    "Site",
    "SiteCoding",
    "check_library_hash",
    "load_library",
]
