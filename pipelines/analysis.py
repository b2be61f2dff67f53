"""Study → findings + SR: the one entry point a worker (or ``locus analyse``) calls.

Stages, each timed:

1. ``inventory``: classify the study's instances, choose the PET, the CT that shares
   its Frame of Reference and covers it, and the SEGs (choices and flags recorded);
2. ``volumes``: build the PET (and CT) volumes with geometry checks;
3. ``suv``: QIBA vendor-neutral SUVbw, or Bq/mL with an explicit flag;
4. ``lesions``: every SEG segment (or 26-connected component) measured in one
   labelled pass per SEG on the PET grid, CT HU on the CT grid;
5. ``localize`` (when a localizer is configured): anatomical site per lesion;
6. ``study_encoding`` (when a study encoder is configured): the HLIP study embedding and
   zero-shot study-level findings from the CT, when it covers the chest;
7. ``report``: the TID 1500 Comprehensive 3D SR (highdicom).

A study without SEG has nothing to measure: the result says so (flag ``no_seg``) and
no SR is written, rather than an empty report; its CT is still encoded when an encoder
is configured, so the study can be found by similar-study search. Refusals are
:class:`InputError`s whose reason the node records and the CLI prints.  A CT that does not
cover the chest (or has no usable axial geometry) is not an error of the study: the
encoding is skipped with a recorded flag and the rest of the analysis goes on.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

from pydicom import Dataset

from pipelines.dicom.inventory import take_inventory
from pipelines.dicom.measure import measure_lesions
from pipelines.dicom.seg import SegObject, read_segments
from pipelines.dicom.series import build_volume_report
from pipelines.dicom.suv import suv_or_fallback
from pipelines.dicom.volume import Volume
from pipelines.errors import InputError
from pipelines.findings import AnalysisResult, Flag, Lesion, Localization, ModelInfo, StudyEncoding
from pipelines.sr.builder import AlgorithmIdentity, DeviceIdentity, build_measurement_report

log = logging.getLogger(__name__)

try:  # the installed distribution's version, so SR and DB record what actually ran
    LOCUS_VERSION = importlib.metadata.version("locus")
except importlib.metadata.PackageNotFoundError:  # running from a source tree without install
    LOCUS_VERSION = "0+unknown"
ALGORITHM_NAME = "Locus PET/CT lesion quantification"

DEFAULT_DEVICE = DeviceIdentity(
    name="Locus",
    manufacturer="Locus project",
    model_name="Locus PET/CT node",
    version=LOCUS_VERSION,
)


class LesionLocalizer(Protocol):
    """What the analysis needs from an anatomical localizer (see pipelines.models.localizer)."""

    @property
    def models(self) -> Sequence[ModelInfo]:
        """The models whose outputs the SR names."""

    def localize_lesions(
        self, *, ct: Volume | None, suv: Volume, lesions: Sequence[Lesion], segs: Sequence[SegObject]
    ) -> list[Localization | None]:
        """One location per lesion (None where the model gives none), in the lesions' order."""


class StudyEncoderLike(Protocol):
    """What the analysis needs from a study encoder (see pipelines.models.study_encoder.model)."""

    @property
    def model_info(self) -> ModelInfo:
        """The model the SR names as the encoding's source."""

    @property
    def last_timings(self) -> dict[str, float]:
        """Seconds per step of the last encoding, for the analysis log."""

    def encode(self, ct: Volume, *, body_part_examined: str | None = None) -> StudyEncoding:
        """The study-level encoding of a CT volume."""


@dataclass(frozen=True)
class AnalysisOptions:
    """Plain arguments of one analysis (the node maps its settings onto these)."""

    lesion_mode: Literal["segments", "components"] = "segments"
    tilt: Literal["refuse", "resample"] = "resample"
    study_version: int = 1
    predecessor: tuple[str, str, str, str] | None = None
    device: DeviceIdentity = DEFAULT_DEVICE
    write_report: bool = True
    content_datetime: datetime.datetime | None = None
    uid_prefix: str | None = None
    localizer: LesionLocalizer | None = None
    study_encoder: StudyEncoderLike | None = None


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 4)


def analyse_study(items: Sequence[str | Path | Dataset], options: AnalysisOptions | None = None) -> AnalysisResult:
    """Analyse the instances of one study (files, folders or datasets)."""
    opts = options or AnalysisOptions()
    timer = _Timer()
    t_start = time.perf_counter()

    with timer.stage("inventory"):
        inv = take_inventory(items)
    result = AnalysisResult(study_instance_uid=inv.study_instance_uid)
    result.series.extend(inv.choices)
    result.flags.extend(inv.flags)
    for item in inv.ignored:
        # by UID only: the source path is a server detail that must not reach the PACS (issue 12)
        result.flags.append(Flag("instance_ignored", f"{item.label}: {item.reason} ({item.code})"))

    if not inv.segs:
        log.info("study %s: no SEG, nothing to measure", inv.study_instance_uid)
        if not any(f.code == "no_seg" for f in result.flags):
            result.flags.append(Flag("no_seg", "the study holds no SEG object: no lesions to measure, no report"))
        if opts.study_encoder is not None:  # the embedding still makes the study searchable
            ct_only: Volume | None = None
            if inv.ct is not None:
                try:
                    with timer.stage("volumes"):
                        ct_build = build_volume_report(inv.ct_headers or [], tilt=opts.tilt)
                except InputError as exc:  # nothing else needs this CT: the study stays "no SEG", not failed
                    why = f"no study embedding: the CT cannot be built: {exc.reason} [{exc.code}]"
                    result.flags.append(Flag("study_encoding_skipped", why))
                else:
                    result.flags.extend(ct_build.flags)
                    ct_only = ct_build.volume
            if ct_only is not None or inv.ct is None:
                _encode_study(opts.study_encoder, ct_only, inv.ct_headers or [], result, timer)
        result.timings_s = dict(timer.timings, total=round(time.perf_counter() - t_start, 4))
        return result

    with timer.stage("volumes"):
        pet_build = build_volume_report(inv.pet_headers, tilt=opts.tilt)
        result.flags.extend(pet_build.flags)
        ct: Volume | None = None
        if inv.ct is not None:
            ct_build = build_volume_report(inv.ct_headers or [], tilt=opts.tilt)
            result.flags.extend(ct_build.flags)
            ct = ct_build.volume

    with timer.stage("suv"):
        conversion = suv_or_fallback(inv.pet_headers)
        suv_volume = conversion.apply(pet_build.volume)
        result.suv = conversion.info
        result.flags.extend(conversion.info.flags)

    with timer.stage("lesions"):
        segs = [read_segments(_full_dataset(ds)) for ds in inv.seg_headers]
        for seg in segs:
            measured = measure_lesions(seg, suv_volume, ct=ct, mode=opts.lesion_mode)
            result.lesions.extend(measured.lesions)
            result.flags.extend(measured.flags)
        if not result.lesions:
            result.flags.append(Flag("no_lesions", "the SEG objects hold no non-empty segment"))

    if opts.localizer is not None and result.lesions and ct is None:
        # The localizer's first input channel is CT (HCL-AL, Gao et al. 2025): say that, not "no localizer".
        why = "the study has no CT, which the anatomical localizer needs (its first input channel)"
        result.flags.append(Flag("location_not_assessed", f"lesions not localized: {why}"))
        result.lesions = [replace(les, flags=(*les.flags, Flag("location_no_ct", f"not localized: {why}")))
                          for les in result.lesions]  # fmt: skip
    elif opts.localizer is not None and result.lesions:
        with timer.stage("localize"):
            locs = opts.localizer.localize_lesions(ct=ct, suv=suv_volume, lesions=result.lesions, segs=segs)
            result.lesions = [replace(les, localization=loc) for les, loc in zip(result.lesions, locs, strict=True)]
            if any(loc is not None for loc in locs):  # a model that produced nothing is not a contributor
                result.models.extend(opts.localizer.models)
    elif result.lesions:
        result.flags.append(Flag("location_not_assessed", "no anatomical localizer configured"))
    result.lesions = _with_seg_regions(result.lesions, segs)

    if opts.study_encoder is not None:
        _encode_study(opts.study_encoder, ct, inv.ct_headers or [], result, timer)

    if opts.write_report and result.lesions:
        with timer.stage("report"):
            evidence: list[Dataset] = [seg.dataset for seg in segs]
            evidence.extend(inv.pet_headers)
            evidence.extend(inv.ct_headers or [])
            sr = build_measurement_report(
                lesions=result.lesions,
                suv=result.suv,
                evidence=evidence,
                device=opts.device,
                algorithm=AlgorithmIdentity(
                    name=ALGORITHM_NAME,
                    version=LOCUS_VERSION,
                    parameters=(f"lesions={opts.lesion_mode}", f"tilt={opts.tilt}"),
                ),
                models=result.models,
                study_version=opts.study_version,
                predecessor=opts.predecessor,
                study_encoding=result.study_encoding,
                flags=result.flags,
                content_datetime=opts.content_datetime,
                uid_prefix=opts.uid_prefix,
            )
            result.sr_dataset = sr
            result.sr_sop_instance_uid = str(sr.SOPInstanceUID)

    result.timings_s = dict(timer.timings, total=round(time.perf_counter() - t_start, 4))
    log.info("study %s: %d lesions in %.2fs", inv.study_instance_uid, len(result.lesions), result.timings_s["total"])
    return result


def _encode_study(encoder: StudyEncoderLike, ct: Volume | None, ct_headers: Sequence[Dataset],
                  result: AnalysisResult, timer: _Timer) -> None:  # fmt: skip
    """The ``study_encoding`` stage: embedding + zero-shot findings, or a flag saying why not.

    Input-side refusals are flags, so lesion results are still reported: ``study_encoding_no_ct``
    (no CT), ``study_encoding_not_chest`` (no lungs found, hlip-compat §9 note),
    ``study_encoding_skipped`` (any other refusal of the CT, e.g. sheared or oblique geometry;
    the error code is in the message).  Model failures (:class:`~pipelines.errors.ModelError`)
    propagate and fail the analysis with their reason.
    """
    if ct is None:
        result.flags.append(Flag("study_encoding_no_ct", "no CT in the study: no study embedding or zero-shot "
                                 "findings (the study encoder needs a chest-covering CT)"))  # fmt: skip
        return
    body_part = None
    if ct_headers:  # (0018,0015) Body Part Examined: a tie-breaker only (see .study_encoder.thorax)
        body_part = str(ct_headers[0].get("BodyPartExamined", "") or "").strip() or None
    with timer.stage("study_encoding"):
        try:
            encoding = encoder.encode(ct, body_part_examined=body_part)
        except InputError as exc:
            log.info("study %s: study encoding skipped (%s)", result.study_instance_uid, exc.code)
            code = "study_encoding_not_chest" if exc.code == "ct_not_chest" else "study_encoding_skipped"
            result.flags.append(Flag(code, f"no study embedding or zero-shot findings: {exc.reason} [{exc.code}]"))
            return
    for key, seconds in encoder.last_timings.items():  # preprocess_s, forward_s, zeroshot_s
        timer.timings[f"study_encoding.{key.removesuffix('_s')}"] = round(seconds, 4)
    result.study_encoding = encoding
    if all(m.model_id != encoding.model.model_id for m in result.models):
        result.models.append(encoding.model)


def _with_seg_regions(lesions: Sequence[Lesion], segs: Sequence[SegObject]) -> list[Lesion]:
    """Attach each unlocalized lesion's SEG Anatomic Region Sequence (the sender's own coding)."""
    regions = {(seg.sop_instance_uid, info.number): info.anatomic_regions for seg in segs for info in seg.segments}
    return [les if les.localization is not None or not regions.get((les.seg_sop_instance_uid, les.segment_number))
            else replace(les, seg_anatomic_regions=regions[(les.seg_sop_instance_uid, les.segment_number)])
            for les in lesions]  # fmt: skip


def _full_dataset(ds: Dataset) -> Dataset:
    """SEG headers were read without pixels; re-read the file for the frames."""
    if "PixelData" in ds or "FloatPixelData" in ds:
        return ds
    import pydicom

    filename = getattr(ds, "filename", None)
    if not filename:
        return ds
    return pydicom.dcmread(str(filename))
