"""Adapter: the HCL-AL-compatible localizer + the anatomy library → coded lesion locations.

The localizer names locations with HCL-AL's strings (the released weights were trained
on them); the library's crosswalk maps each string (or, under HCL-AL's large-lesion
rule, the coarse key) to a coded Locus site, which becomes the SR Finding Site
(TID 300, SCT 363698007) with laterality and topographical modifiers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from library import AnatomyLibrary, load_library
from library.errors import LibraryError
from pipelines.dicom.seg import Mode, SegObject, SourceRegion
from pipelines.dicom.volume import Volume
from pipelines.findings import CodedValue, Flag, Lesion, Localization, ModelInfo, SiteAssignment
from pipelines.models.localizer.lesion_mask import LesionBox
from pipelines.models.localizer.model import Localizer, LocalizerOutput


def site_assignment(library: AnatomyLibrary, out: LocalizerOutput) -> SiteAssignment | None:
    """The coded site for a localizer output (None when the string has no crosswalk entry)."""
    try:
        site = (library.hclal_coarse_node(out.final_label) if out.large_lesion
                else library.hclal_site(out.final_label))
    except LibraryError:
        return None
    coding = site.to_assignment()
    return SiteAssignment(
        site_id=coding.site_id,
        name=coding.name,
        code=CodedValue(**coding.code.as_dict()),
        laterality=CodedValue(**coding.laterality.as_dict()) if coding.laterality else None,
        modifiers=tuple(CodedValue(**m.as_dict()) for m in coding.modifiers),
        approximate=coding.approximate,
    )


def _region_volume(region: SourceRegion, seg: SegObject) -> Volume:
    """The lesion's binary mask as a Volume on the SEG grid, cropped to its bounding box."""
    k0, j0, i0 = region.offset
    affine = np.array(region.affine, dtype=np.float64)
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.array([i0, j0, k0], dtype=np.float64) + affine[:3, 3]
    return Volume(array=region.mask.astype(np.uint8), affine=shifted,
                  frame_of_reference_uid=seg.frame_of_reference_uid, modality="SEG")


class LibraryLocalizer:
    """Implements ``pipelines.analysis.LesionLocalizer`` for a loaded :class:`Localizer`."""

    def __init__(self, localizer: Localizer, library: AnatomyLibrary | None = None) -> None:
        self.localizer = localizer
        self.library = library or load_library()

    @property
    def models(self) -> Sequence[ModelInfo]:
        """The localizer model the SR names."""
        return [self.localizer.model_info]

    def localize_lesions(self, *, ct: Volume | None, suv: Volume, lesions: Sequence[Lesion],
                         segs: Sequence[SegObject]) -> list[Localization | None]:
        """One library location per lesion; None for every lesion without a CT (the model's first channel)."""
        if ct is None:  # the model's first channel is CT: no CT, no location (flagged by the SR)
            return [None] * len(lesions)
        by_uid = {s.sop_instance_uid: s for s in segs}
        masks: list[Volume] = []
        boxes: list[LesionBox] = []
        for les in lesions:
            seg = by_uid[les.seg_sop_instance_uid]
            mode: Mode = "segments" if les.component is None else "components"
            region = next(r for r in seg.source_regions([les.segment_number], mode)
                          if r.component == les.component)
            masks.append(_region_volume(region, seg))
            boxes.append(LesionBox(centre=les.bbox.center_mm, size=les.bbox.size_mm))
        outs = self.localizer.localize(ct, suv, masks, boxes=boxes)
        result: list[Localization | None] = []
        for out in outs:
            site = site_assignment(self.library, out)
            loc = out.to_localization(site)
            if site is None:
                loc = Localization(**{**loc.__dict__, "flags": (*loc.flags, Flag(
                    "site_unmapped", f"no coded site for localizer label {out.final_label!r}"))})
            result.append(loc)
        return result
