"""``locus encode-study PATH...``: the HLIP study encoder offline, with an optional relevance map.

Encodes one study's chest-covering CT with the encoder configured in ``models.study_encoder_*``
(the same one the worker uses), prints the zero-shot findings with the model identity and
flags, and with ``--relevance FINDING --nifti OUT.nii.gz`` writes the attention x gradient
relevance map of that finding (:mod:`pipelines.models.study_encoder.interpret`) on the
preprocessed grid, in patient coordinates, for review beside the CT in any NIfTI viewer.

The CT series is the one with the most slices among the CT image series found under PATH
(a PET is not needed); which one was used is printed.

PATH may instead be one CT volume as NIfTI (``.nii``/``.nii.gz``, e.g. a CT-RATE volume),
read with SimpleITK as the published HLIP loader does (HLIP, arXiv 2505.21862): values become HU
as ``stored × slope + intercept`` with ``--rescale SLOPE INTERCEPT`` (CT-RATE's metadata
``RescaleSlope``/``RescaleIntercept``; default: the values are already HU, after NIfTI's own
``scl_slope``/``scl_inter``), and the voxel spacing comes from ``--xy-spacing``/``--z-spacing``
(CT-RATE's ``XYSpacing``/``ZSpacing``) when given, else from the NIfTI header.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

from node.settings import LocusSettings

if TYPE_CHECKING:  # imported lazily at run time: `locus --help` must not load numpy
    from pipelines.dicom.volume import Volume


def _ct_series(paths: tuple[Path, ...]) -> list:
    """Headers (no pixels) of the largest CT image series under ``paths``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    series: dict[str, list] = defaultdict(list)
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if ds.get("Modality") == "CT" and "ImagePositionPatient" in ds and "Rows" in ds:
            series[str(ds.SeriesInstanceUID)].append(ds)
    if not series:
        raise click.ClickException("no CT image series found under the given paths")
    return max(series.values(), key=len)


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    """Whether a path is a NIfTI file, which takes the CT-RATE loader path instead of DICOM."""
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_ct(path: Path, *, rescale: tuple[float, float] | None = None, xy_spacing: float | None = None,
             z_spacing: float | None = None) -> tuple[Volume, list[str]]:  # fmt: skip
    """A CT Volume (HU) from a NIfTI file, with the published loader's HU and spacing rules; plus notes.

    Why the options: CT-RATE volumes store raw values and carry the rescale and spacing in a
    metadata table, which the published loader applies instead of trusting the header.
    """
    import numpy as np
    import SimpleITK as sitk

    from pipelines.dicom.volume import Volume

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise click.ClickException(f"{path.name} is not a readable NIfTI image: {str(exc).strip()[:200]}") from exc
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise click.ClickException(f"{path.name} is not a single-channel 3-D volume")
    notes = []
    spacing = list(img.GetSpacing())
    if xy_spacing is not None or z_spacing is not None:
        spacing = [xy_spacing or spacing[0], xy_spacing or spacing[1], z_spacing or spacing[2]]
        if min(spacing) <= 0:
            raise click.ClickException("--xy-spacing and --z-spacing must be positive")
        img.SetSpacing(spacing)
        notes.append(f"spacing (x, y, z) {spacing[0]:g}, {spacing[1]:g}, {spacing[2]:g} mm from the command line")
    volume = Volume.from_sitk(img, modality="CT", series_instance_uid="")
    arr = volume.array.astype(np.float32)
    if rescale is not None:
        arr = arr * np.float32(rescale[0]) + np.float32(rescale[1])
        notes.append(f"HU = stored x {rescale[0]:g} + {rescale[1]:g} (--rescale)")
    elif arr.size and float(arr.min()) >= 0.0:
        notes.append("warning: no value below 0: these look like stored values, not HU; pass --rescale SLOPE "
                     "INTERCEPT (e.g. CT-RATE's RescaleSlope and RescaleIntercept)")  # fmt: skip
    return volume.with_array(arr), notes


@click.command("encode-study")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--relevance", "finding_id", default=None,
              help="Finding id of the prompt set (e.g. pleural_effusion) to explain with a relevance map.")
@click.option("--nifti", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the relevance map here (.nii.gz); needs --relevance.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (the embedding included).")
@click.option("--rescale", type=(float, float), default=None, metavar="SLOPE INTERCEPT",
              help="NIfTI input: HU = stored x SLOPE + INTERCEPT (default: values are HU).")
@click.option("--xy-spacing", type=float, default=None, help="NIfTI input: in-plane spacing in mm (default: header).")
@click.option("--z-spacing", type=float, default=None, help="NIfTI input: slice spacing in mm (default: header).")
@click.pass_context
def encode_study(ctx: click.Context, paths: tuple[Path, ...], finding_id: str | None, nifti: Path | None,
                 as_json: bool, rescale: tuple[float, float] | None, xy_spacing: float | None,
                 z_spacing: float | None) -> None:  # fmt: skip
    """Encode a study's chest CT with the configured HLIP encoder; optionally map a finding's relevance."""
    from node.models import study_encoder_config
    from pipelines.dicom.series import build_volume_report
    from pipelines.errors import LocusError
    from pipelines.models.study_encoder import interpret
    from pipelines.models.study_encoder.model import StudyEncoder

    if (finding_id is None) != (nifti is None):
        raise click.UsageError("--relevance and --nifti go together")
    settings = ctx.find_object(LocusSettings)
    if settings is None:
        raise click.UsageError("no settings on the click context (run through the `locus` command)")
    try:
        config = study_encoder_config(settings)
        if config is None:
            raise click.ClickException("no study encoder configured: set models.study_encoder_checkpoint and "
                                       "models.study_encoder_text_dir (LOCUS_MODELS__STUDY_ENCODER_*)")  # fmt: skip
        niftis = [p for p in paths if is_nifti(p)]
        notes: list[str] = []
        if niftis:
            if len(paths) != 1:
                raise click.UsageError("give one NIfTI CT volume, or DICOM files and folders, not both")
            ct, notes = nifti_ct(niftis[0], rescale=rescale, xy_spacing=xy_spacing, z_spacing=z_spacing)
            for note in notes:  # before encoding, so a refusal that follows is explained
                click.echo(note, err=True)
            headers: list = []
            body_part = None
        else:
            if rescale is not None or xy_spacing is not None or z_spacing is not None:
                raise click.UsageError("--rescale, --xy-spacing and --z-spacing apply to NIfTI input only "
                                       "(DICOM carries its own rescale and spacing)")  # fmt: skip
            headers = _ct_series(paths)
            ct = build_volume_report(headers).volume
            body_part = str(headers[0].get("BodyPartExamined", "") or "").strip() or None
        encoder = StudyEncoder(config)
        encoding = encoder.encode(ct, body_part_examined=body_part)
        rmap = None
        if finding_id is not None and nifti is not None:
            rmap = interpret.relevance_map(encoder, ct, finding_id, body_part_examined=body_part)
            rmap.to_nifti(nifti)
    except LocusError as exc:
        raise click.ClickException(f"{exc.reason} [{exc.code}]") from exc

    if as_json:
        out = {"series_instance_uid": ct.series_instance_uid, "encoding": asdict(encoding),
               "timings_s": encoder.last_timings, "input_notes": notes}  # fmt: skip
        if rmap is not None:
            out["relevance"] = {"finding_id": rmap.finding_id, "finding": rmap.finding, "nifti": str(nifti),
                                "logit_difference": rmap.logit_difference, "score": rmap.score,
                                "shape_zyx": list(rmap.volume.array.shape), "method": rmap.method}  # fmt: skip
        click.echo(json.dumps(out, indent=2))
        return
    m = encoding.model
    click.echo(f"CT series {ct.series_instance_uid} ({len(headers)} slices)" if headers
               else f"CT volume {niftis[0].name} ({ct.array.shape[0]} slices)")
    click.echo(f"model {m.model_id}  {m.name}  weights sha256 {m.sha256[:16]}…")
    click.echo(f"preprocessing {encoding.preprocessing_version}  prompts {encoding.prompt_set_version}  "
               f"embedding {len(encoding.embedding)}-d")  # fmt: skip
    click.echo(f"input: {encoding.crop_description}")
    click.echo("AI-derived zero-shot scores (research/triage aid, not a diagnosis):")
    for f in encoding.findings:
        decision = "" if f.present is None else f"  {'PRESENT' if f.present else 'absent'} (> {f.threshold:g})"
        click.echo(f"  {f.score:6.3f}  {f.finding}{decision}")
    for flag in encoding.flags:
        click.echo(f"flag {flag.code}: {flag.message}")
    if rmap is not None:
        click.echo(f"relevance map of {rmap.finding} (logit difference {rmap.logit_difference:+.3f}) "
                   f"written to {nifti}")  # fmt: skip
