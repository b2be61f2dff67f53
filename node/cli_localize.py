"""``locus localize``: run the HCL-AL-compatible localizer on NIfTI/NRRD files or HCL-AL CSVs.

Two ways to name the inputs:

* ``--ct CT --suv SUV --mask MASK [--boxes CSV]``: one study; ``MASK`` is a label image
  (one id per lesion, like HCL-AL's ``SEG_MultiLabel.nii.gz``).
* ``--input-csv CSV``: HCL-AL's own inference CSV (``image_path, image_path1,
  image_path2`` per row; with ``x, y, z, width, height, depth`` it is box mode, without
  them mask mode), rows grouped by study as the reference does.

Box mode uses the given boxes (LPS mm centre and extent).  Mask mode derives the lesions
from the mask: in ``hcl-al`` geometry mode as HCL-AL does (26-connected components of all
nonzero voxels, boxes from ``calc_lesion_bbox``, coarse stage binarised at the component
id: bug B5); in ``corrected`` mode one lesion per label value with its exact box.

The output CSV has HCL-AL's ``*_pred.csv`` columns (input columns, then ``coarse_labels,
coarse_probs, fine_to_coarse_labels, fine_labels, fine_probs, pred``; mask mode adds
``class`` and the computed box first), formatted like the reference, so the two tools can
be compared line by line.  ``--with-flags`` appends Locus's flags and model identity.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

BOX_COLUMNS = ("x", "y", "z", "width", "height", "depth")
IMAGE_COLUMNS = ("image_path", "image_path1", "image_path2")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _cases_from_input_csv(path: Path) -> tuple[str, list[tuple[tuple[str, ...], list[dict[str, str]]]]]:
    fields, rows = _read_csv(path)
    missing = [c for c in IMAGE_COLUMNS if c not in fields]
    if missing:
        raise click.UsageError(f"{path} lacks columns {missing}; Locus needs CT, SUV and mask (3 channels)")
    mode = "box" if all(c in fields for c in BOX_COLUMNS) else "mask"
    cases: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for row in rows:
        cases.setdefault(tuple(row[c] for c in IMAGE_COLUMNS), []).append(row)
    return mode, list(cases.items())


def _fmt(value: float) -> str:
    return repr(float(value))


def _case_rows(localizer: Any, mode: str, images: Sequence[str], rows: list[dict[str, str]]) -> Iterator[tuple[dict[str, str], Any]]:
    """Yield (output row without results, LocalizerOutput) for one study."""
    import SimpleITK as sitk
    from scipy import ndimage

    from pipelines.errors import InputError
    from pipelines.models.localizer.lesion_mask import (
        LesionBox,
        box_iou,
        exact_box,
        reference_box_from_bounds,
    )
    from pipelines.models.localizer.model import LesionQuery

    try:
        ct, suv, mask = (sitk.ReadImage(p, sitk.sitkFloat32) for p in images)
    except RuntimeError as exc:
        raise InputError(f"cannot read study images {list(images)}: {exc}", code="image_unreadable") from exc
    queries: list[LesionQuery] = []
    out_rows: list[dict[str, str]] = []
    mask_arr = sitk.GetArrayViewFromImage(mask)
    if mode == "box":
        labels = [float(v) for v in np.unique(mask_arr) if v != 0]
        label_boxes = {lab: exact_box(mask, lab) for lab in labels} if not localizer.compat else {}
        for row in rows:
            try:
                vals = [float(row[c]) for c in BOX_COLUMNS]
            except (KeyError, ValueError) as exc:
                raise InputError(f"bad box row {row}: {exc}", code="box_invalid") from exc
            box = LesionBox(tuple(vals[:3]), tuple(vals[3:]))  # type: ignore[arg-type]
            if localizer.compat:
                queries.append(LesionQuery(box, mask))
            else:  # the label whose exact box overlaps the query box most; -1 (no voxels) if none
                scored = [(box_iou(box.as_array(), b.as_array()), lab) for lab, b in label_boxes.items() if b]
                best = max(scored, default=(0.0, -1.0))
                queries.append(LesionQuery(box, mask, label=best[1] if best[0] > 0 else -1.0))
            out_rows.append(dict(row))
    else:
        if localizer.compat:
            cc, n = ndimage.label(mask_arr.astype(np.int32), structure=np.ones((3, 3, 3), dtype=int))
            slices = ndimage.find_objects(cc)
            cc_img = sitk.GetImageFromArray(cc.astype(np.int32))
            cc_img.CopyInformation(mask)
            items = []
            for lab in range(1, n + 1):
                z, y, x = slices[lab - 1]
                box = reference_box_from_bounds(cc_img, np.array([x.start, y.start, z.start]),
                                                np.array([x.stop - 1, y.stop - 1, z.stop - 1]))  # fmt: skip
                items.append((box, LesionQuery(box, mask, target_label=lab)))
        else:
            items = []
            for value in (float(v) for v in np.unique(mask_arr) if v != 0):
                exact = exact_box(mask, value)
                assert exact is not None  # the value occurs in the mask (np.unique)
                items.append((exact, LesionQuery(exact, mask, label=value)))
        for box, query in items:
            row = {"class": "bbox", **rows[0]}
            row.update(zip(BOX_COLUMNS, (_fmt(v) for v in (*box.centre, *box.size))))
            out_rows.append(row)
            queries.append(query)
    yield from zip(out_rows, localizer.localize_images(ct, suv, queries))


@dataclass(frozen=True)
class _Release:
    """The four files of an HCL-AL release and where they came from (said on stderr)."""

    files: tuple[Path, Path, Path, Path]
    source: str
    model_id: str | None = None
    expected: Any = None  # LocalizerSpec of a registry entry (pins the files' hashes)


def _release(ctx: click.Context, coarse: Path | None, fine: Path | None, vocabulary: Path | None,
             descriptions: Path | None) -> _Release:
    """The localizer to run: the four files given, else ``models.localizer_checkpoint`` (a
    release directory or a registry file with ``models.localizer_id``), else the demo
    localizer shipped in ``node/demo_localizer`` (as ``locus demo`` does)."""
    given = {"--coarse": coarse, "--fine": fine, "--vocabulary": vocabulary, "--descriptions": descriptions}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise click.UsageError(f"give all four release files or none (missing {', '.join(missing)}); without "
                                   "them the configured or the shipped demo localizer is used")
        return _Release((coarse, fine, vocabulary, descriptions), "the files given")  # type: ignore[arg-type]
    from node.cli_demo import DEMO_LOCALIZER, demo_localizer_dir
    from node.settings import LocusSettings

    settings = ctx.find_object(LocusSettings) or LocusSettings.load()
    cfg = settings.models
    path = cfg.resolve(cfg.localizer_checkpoint)
    if path is None:
        shipped = demo_localizer_dir()
        if shipped is None:
            raise click.UsageError(f"no localizer: none configured (models.localizer_checkpoint), {DEMO_LOCALIZER} is "
                                   "incomplete, and --coarse/--fine/--vocabulary/--descriptions were not given")
        return _Release(_release_files(shipped), f"demo weights in {shipped} (trained on synthetic phantoms only)")
    if path.suffix == ".json":
        from pipelines.models.registry import ModelRegistry

        if cfg.localizer_id is None:
            raise click.UsageError(f"{path} is a model registry: set models.localizer_id")
        spec = ModelRegistry.from_file(path).get(cfg.localizer_id)
        files = (Path(spec.coarse.path), Path(spec.fine.path), Path(spec.vocabulary.path),
                 Path(spec.descriptions.path))
        return _Release(files, f"{cfg.localizer_id} from {path} (configured)", cfg.localizer_id, spec)
    if not path.is_dir():
        raise click.UsageError(f"models.localizer_checkpoint {path} is neither a release directory nor a registry")
    return _Release(_release_files(path), f"{path} (configured)", cfg.localizer_id)


def _release_files(root: Path) -> tuple[Path, Path, Path, Path]:
    """The four files of a directory in HCL-AL's release layout (node.models reads the same)."""
    files = (root / "coarse" / "params.pth", root / "fine" / "params.pth",
             root / "anatomy_vocabulary_library.json", root / "augmented_location_descriptions.json")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise click.UsageError(f"localizer directory {root} lacks {', '.join(missing)}")
    return files


@click.command("localize")
@click.option("--ct", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="CT in HU (NIfTI, NRRD, MHA).")
@click.option("--suv", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="PET in SUV.")
@click.option("--mask", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Lesion label image.")
@click.option("--boxes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with x,y,z,width,height,depth (LPS mm) per lesion: box mode.")  # fmt: skip
@click.option("--input-csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="HCL-AL inference CSV (box or mask mode), instead of --ct/--suv/--mask.")  # fmt: skip
@click.option("--coarse", type=click.Path(exists=True, path_type=Path),
              help="Coarse params.pth (or its folder). With --fine, --vocabulary, --descriptions; without all four: "
                   "models.localizer_checkpoint, else the shipped demo localizer.")  # fmt: skip
@click.option("--fine", type=click.Path(exists=True, path_type=Path), help="Fine params.pth (or its folder).")
@click.option("--vocabulary", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="anatomy_vocabulary_library.json")  # fmt: skip
@click.option("--descriptions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="augmented_location_descriptions.json")  # fmt: skip
@click.option("--geometry-mode", type=click.Choice(["corrected", "hcl-al"]), default="corrected", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda:0")
@click.option("--topk", default=3, show_default=True, help="coarse candidates kept for the fine stage")
@click.option("--batch-size", type=int, default=None, help="lesions per encoder forward")
@click.option("--output", "-o", default="-", show_default=True, help="output CSV path ('-' = stdout)")
@click.option("--with-flags", is_flag=True, help="append locus_flags, locus_model_id, locus_model_sha256 columns")
@click.pass_context
def localize(
    ctx: click.Context, ct: Path | None, suv: Path | None, mask: Path | None, boxes: Path | None,
    input_csv: Path | None, coarse: Path | None, fine: Path | None, vocabulary: Path | None,
    descriptions: Path | None, geometry_mode: str, device: str, topk: int, batch_size: int | None, output: str,
    with_flags: bool,
) -> None:  # fmt: skip
    """Name the anatomical site of each lesion with HCL-AL-compatible checkpoints."""
    from pipelines.errors import LocusError
    from pipelines.models.localizer import Localizer

    if input_csv is not None:
        if ct or suv or mask or boxes:
            raise click.UsageError("use either --input-csv or --ct/--suv/--mask, not both")
        mode, cases = _cases_from_input_csv(input_csv)
    else:
        if not (ct and suv and mask):
            raise click.UsageError("--ct, --suv and --mask are required without --input-csv")
        base = {"image_path": str(ct), "image_path1": str(suv), "image_path2": str(mask)}
        if boxes is not None:
            fields, box_rows = _read_csv(boxes)
            if not all(c in fields for c in BOX_COLUMNS):
                raise click.UsageError(f"{boxes} needs columns {', '.join(BOX_COLUMNS)}")
            mode, cases = "box", [(tuple(base.values()), [{**base, **r} for r in box_rows])]
        else:
            mode, cases = "mask", [(tuple(base.values()), [base])]
    release = _release(ctx, coarse, fine, vocabulary, descriptions)
    click.echo(f"localizer: {release.source}", err=True)
    try:
        loc = Localizer.load(*release.files, device=device, geometry_mode=geometry_mode, coarse_topk=topk,
                             batch_size=batch_size, model_id=release.model_id, expected=release.expected)
        results = [(row, res) for images, rows in cases for row, res in _case_rows(loc, mode, images, rows)]
    except LocusError as exc:
        raise click.ClickException(f"{exc.code}: {exc.reason}") from exc
    out_rows = []
    for row, res in results:
        full = {**row, **res.hclal_columns()}
        if with_flags:
            full["locus_flags"] = ";".join(f.code for f in res.flags)
            full["locus_model_id"] = res.model.model_id
            full["locus_model_sha256"] = res.model.sha256
        out_rows.append(full)
    columns: list[str] = []
    for r in out_rows:
        columns.extend(k for k in r if k not in columns)
    fh = sys.stdout if output == "-" else open(output, "w", encoding="utf-8", newline="")  # noqa: SIM115  # stdout or a file; closed in finally
    try:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(out_rows)
    finally:
        if fh is not sys.stdout:
            fh.close()
    click.echo(f"localized {len(out_rows)} lesions with {loc.model_info.model_id} ({geometry_mode})", err=True)
