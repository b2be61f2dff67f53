"""The one in-memory form of localizer training/evaluation data, whatever its source.

Every reader (the synthetic phantom, HCL-AL's on-disk layout, a dataset exported by a
Locus node from its results database) yields :class:`StudyRecord` objects, so training,
calibration and evaluation never care where a study came from.

Conventions (the same as :class:`pipelines.dicom.volume.Volume`): arrays are ``[k, j, i]``
and affines map index ``(i, j, k)`` to patient LPS millimetres.  ``labels`` is a
multi-label lesion map (HCL-AL's lesion-mask convention, 0 = background); each
:class:`LesionRecord` names its label value.  Ground truth is a *set* of acceptable
answers, because HCL-AL's evaluation GT (``anno.csv`` column ``GT``) is a comma-separated
list of acceptable final strings: ``sites`` holds Locus library site ids (first = the
primary answer) and ``hclal_locations`` the HCL-AL final strings when the source has them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipelines.dicom.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    from training.phantom.reports import ItemizedReport


@dataclass(frozen=True)
class LesionRecord:
    """One lesion: its label in the study's label map and its ground-truth location(s)."""

    lesion_id: str
    label: int
    sites: tuple[str, ...]  # library site ids, primary first; empty = location unknown
    hclal_locations: tuple[str, ...] = ()  # HCL-AL final strings, when the source has them
    coarse_keys: tuple[str, ...] = ()  # HCL-AL coarse keys, when the source has them


@dataclass
class StudyRecord:
    """One study: CT (HU), SUV and the lesion label map, with where it came from."""

    study_id: str  # stable key used for splits (phantom seed, HCL-AL folder name, Study Instance UID)
    suv: Volume
    ct: Volume | None
    labels: Volume  # integer label map; lesions refer to it by value
    lesions: list[LesionRecord] = field(default_factory=list)
    source: str = ""  # e.g. "phantom:seed=11,size=small", "hclal:/data/case01", "locus:<study uid>@v2"
    report: ItemizedReport | None = None  # itemized report (phantoms: training.phantom.reports), when the source has one

    def __iter__(self) -> Iterator[LesionRecord]:
        return iter(self.lesions)
