"""``locus dataset export OUT_DIR``: the site's reviewed lesions as a dataset in HCL-AL's layout.

See :mod:`node.dataset_export` for what is written; ``training.data.hclal`` reads it back.
Studies that cannot be rebuilt are listed with their reason (here and in ``manifest.json``);
the command exits 1 when nothing could be exported although studies were selected.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import click

from node.settings import LocusSettings


@click.group("dataset")
def dataset() -> None:
    """Training datasets from this node's reviewed results."""


@dataset.command("export")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--reviewed-only/--all", "reviewed_only", default=True, show_default=True,
              help="Ground truth from reviews only, or fall back to the localizer's prediction.")
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]), default=None,
              help="Only studies analysed or reviewed at or after this UTC date/time.")
@click.option("--absolute-paths", is_flag=True, help="Absolute image paths in the CSVs (default: relative).")
@click.option("--json", "as_json", is_flag=True, help="Print the export summary as JSON.")
@click.pass_context
def export(ctx: click.Context, out_dir: Path, reviewed_only: bool, since: dt.datetime | None, absolute_paths: bool,
           as_json: bool) -> None:
    """Write CT/SUV/mask NIfTI per study, bbox.csv, anno.csv, train_*.csv and manifest.json to OUT_DIR."""
    # Imported here: the export pulls in the DICOM pipeline, which `locus --help` does not need.
    from node.dataset_export import ExportError, ExportOptions, export_dataset, select_studies
    from node.db import open_database
    from node.storage import LocalSpool

    settings = ctx.find_object(LocusSettings)
    if settings is None:
        raise click.UsageError("no settings on the click context (run through the `locus` command)")
    options = ExportOptions(
        out_dir=out_dir,
        reviewed_only=reviewed_only,
        since=since.replace(tzinfo=dt.UTC) if since is not None else None,
        absolute_paths=absolute_paths,
    )
    try:
        spool = LocalSpool(settings.storage.spool_dir, create=False)
    except FileNotFoundError as exc:
        raise click.ClickException(f"no spool to export from: {exc}") from exc
    database = open_database(settings.database, create=False)
    try:
        studies = select_studies(database, options)
        with click.progressbar(length=len(studies), label="exporting studies", file=sys.stderr,
                               show_pos=True) as bar:
            summary = export_dataset(database, spool, studies, options, on_study=lambda _uid: bar.update(1))
    except ExportError as exc:
        raise click.ClickException(f"{exc.code}: {exc.reason}") from exc
    finally:
        database.dispose()
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    else:
        click.echo(f"{len(summary.studies)} studies, {summary.lesions} lesions ({summary.ground_truth_rows} with "
                   f"ground truth) written to {summary.out_dir}")
        for s in summary.skipped:
            click.echo(f"skipped {s['study_uid']} v{s['version']} ({s['code']}): {s['reason']}", err=True)
    if studies and not summary.studies:
        sys.exit(1)
