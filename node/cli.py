"""``locus``: the command line of the node.

The root group builds the one :class:`~node.settings.LocusSettings` object (environment
``LOCUS_*`` plus an optional TOML file) and hands it to every subcommand as
``ctx.obj``; logging is configured here and nowhere else.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path

import click

from node.logging import configure_logging
from node.settings import LocusSettings


@click.group()
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), envvar="LOCUS_CONFIG",
              help="TOML settings file (environment variables LOCUS_* override it).")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (default from settings).")
@click.option("--json-logs", is_flag=True, help="One JSON object per log line.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, log_level: str | None, json_logs: bool) -> None:
    """Locus: PET/CT lesion reports for your PACS."""
    from pydantic import ValidationError

    from node.settings import ConfigFileError, LocusSettings

    try:
        settings = LocusSettings.load(config)
    except (ConfigFileError, ValidationError) as exc:
        raise click.ClickException(f"invalid configuration: {exc}") from exc
    configure_logging(log_level or ("WARNING" if ctx.invoked_subcommand in _QUIET else settings.log_level),
                      json_lines=json_logs)
    ctx.obj = settings


# Commands whose output is for people at a terminal: keep INFO logs out of the way.
_QUIET = {"analyse", "results", "library", "exports", "echo", "db", "localize", "demo", "train", "review", "dataset",
          "encode-study"}


def settings_of(ctx: click.Context) -> LocusSettings:
    return ctx.find_object(LocusSettings)  # type: ignore[return-value]


# -- serve / worker ---------------------------------------------------------------------
@main.command()
@click.option("--no-analysis-worker", is_flag=True, help="Leave analyses to separate `locus worker --queues gpu`.")
@click.option("--port", type=int, default=None, help="Override the DICOM port.")
@click.pass_context
def serve(ctx: click.Context, no_analysis_worker: bool, port: int | None) -> None:
    """Run the DICOM listener, completion sweeper, export worker (and an analysis worker)."""
    from node.service import start_node

    settings = settings_of(ctx)
    if port is not None:
        settings = settings.model_copy(update={"dicom": settings.dicom.model_copy(update={"port": port})})
    node = start_node(settings, analysis_worker=not no_analysis_worker)
    click.echo(f"Locus listening as {settings.dicom.ae_title} on "
               f"{node.listener.host}:{node.listener.port}; Ctrl-C to stop", err=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    node.stop()


@main.command()
@click.option("--queues", default="gpu", show_default=True, help="Comma-separated queues: gpu, io.")
@click.option("--concurrency", default=1, show_default=True, type=int)
@click.pass_context
def worker(ctx: click.Context, queues: str, concurrency: int) -> None:
    """Run a Celery worker (e.g. on a GPU machine that mounts the same spool path)."""
    from node.tasks.celery_app import configure_app
    from node.tasks.context import build_context, install_context

    settings = settings_of(ctx)
    wctx = build_context(settings)
    install_context(wctx)
    if concurrency == 1 and "gpu" in queues.split(","):  # solo pool: this process runs the analyses
        from node.models import start_preload  # prefork children preload in worker_process_init

        start_preload(wctx)
    app = configure_app(settings.broker)
    app.worker_main([
        "worker", "--queues", queues, "--concurrency", str(concurrency), "--pool", "prefork" if concurrency > 1 else "solo",
        "--without-gossip", "--without-mingle", "--loglevel", settings.log_level,
    ])


# -- offline analysis ---------------------------------------------------------------------
@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--lesions", "lesion_mode", type=click.Choice(["segments", "components"]), default=None,
              help="One lesion per SEG segment, or per 26-connected component (default: analysis.lesion_mode).")
@click.option("--sr", "sr_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the TID 1500 SR here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def analyse(ctx: click.Context, paths: tuple[Path, ...], lesion_mode: str | None, sr_out: Path | None,
            as_json: bool) -> None:  # fmt: skip
    """Analyse one study's instances (files or folders) offline, as the node's worker would.

    Uses the configured models, or the shipped demo localizer when none is configured
    (the first lines on stderr say which).
    """
    from node.analysis_options import offline_analysis_options, model_sources
    from pipelines.analysis import analyse_study
    from pipelines.errors import LocusError

    settings = settings_of(ctx)
    for source in model_sources(settings, allow_shipped=True)[1]:
        click.echo(source.describe(), err=True)
    try:
        options, _ = offline_analysis_options(settings, lesion_mode=lesion_mode,
                                              progress=lambda msg: click.echo(msg, err=True))
        result = analyse_study(list(paths), options)
    except LocusError as exc:
        click.echo(f"error ({exc.code}): {exc.reason}", err=True)
        sys.exit(2)
    if sr_out is not None:
        if result.sr_dataset is None:
            click.echo("no SR written: " + "; ".join(f.message for f in result.flags), err=True)
        else:
            result.sr_dataset.save_as(sr_out, enforce_file_format=True)
            click.echo(f"SR written to {sr_out}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        from node.presentation import print_lesion_table

        print_lesion_table(result.to_json())


def _attach_optional() -> None:
    """Attach the command groups defined in their own modules."""
    import importlib

    for module, name in (
        ("node.cli_results", "results"),
        ("node.cli_db", "db"),
        ("node.cli_exports", "exports"),
        ("node.cli_echo", "echo_command"),
        ("node.cli_library", "library"),
        ("node.cli_localize", "localize"),
        ("node.cli_demo", "demo"),
        ("node.cli_review", "review"),
        ("node.cli_dataset", "dataset"),
    ):
        mod = importlib.import_module(module)
        main.add_command(getattr(mod, name), name=name.removesuffix("_command"))
    from node.cli_results import results
    from node.cli_similar import similar

    results.add_command(similar, name="similar")
    from node.cli_encode import encode_study

    main.add_command(encode_study, name="encode-study")


def _attach_plugins() -> None:
    """Attach command groups other installed packages declare in the ``locus.commands``
    entry-point group (e.g. ``locus train`` from ``training``, which the node must not
    import).  A plugin that fails to load is skipped with a message; the node still runs."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="locus.commands"):
        if ep.name in main.commands:
            continue
        try:
            main.add_command(ep.load(), name=ep.name)
        except Exception as exc:  # a broken optional plugin must not take the node's CLI down
            print(f"locus: command plugin {ep.name!r} ({ep.value}) not loaded: {type(exc).__name__}: {exc}",
                  file=sys.stderr)


_attach_optional()
_attach_plugins()
