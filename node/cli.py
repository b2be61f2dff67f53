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
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from node.settings import LocusSettings

#: Commands defined in their own modules, imported only when invoked (``locus --help``
#: must not pay for torch, pynetdicom and SQLAlchemy): name -> ("module:attribute", short help).
#: The short help is repeated here so the root help lists commands without importing them;
#: tests/node/test_cli_startup.py checks that it matches each command's own.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "results": ("node.cli_results:results", "Studies, lesions and reports in the results database."),
    "db": ("node.cli_db:db", "Results database maintenance."),
    "exports": ("node.cli_exports:exports", "Report exports to the PACS (C-STORE)."),
    "analyses": ("node.cli_analyses:analyses", "Analyses of study versions: state, attempts, lease, reason; re-run them."),
    "echo": ("node.cli_echo:echo_command", "Send a C-ECHO to TARGET, given as AE@host:port."),
    "library": ("node.cli_library:library", "Anatomy knowledge base: coded sites, hierarchy, HCL-AL crosswalk."),
    "localize": ("node.cli_localize:localize",
                 "Name the anatomical site of each lesion with HCL-AL-compatible checkpoints."),
    "demo": ("node.cli_demo:demo", "Run the node end to end on a synthetic PET/CT study and print the lesions."),
    "review": ("node.cli_review:review",
               "Confirm or correct lesion locations (the ground truth of `locus dataset export`)."),
    "dataset": ("node.cli_dataset:dataset", "Training datasets from this node's reviewed results."),
    "encode-study": ("node.cli_encode:encode_study",
                     "Encode a study's chest CT with the configured HLIP encoder; optionally map a finding's relevance."),
}


def _import_command(target: str) -> click.Command:
    import importlib

    module, _, attr = target.partition(":")
    command = getattr(importlib.import_module(module), attr)
    if not isinstance(command, click.Command):
        raise TypeError(f"{target} is not a click command")
    return command


class LazyGroup(click.Group):
    """A group whose subcommands are imported when used, plus ``locus.commands`` plugins.

    Plugins are command groups other installed packages declare in the ``locus.commands``
    entry-point group (e.g. ``locus train`` from ``training``, which the node must not
    import).  A plugin that fails to load is skipped with a message; the node still runs.
    """

    def __init__(self, *args: Any, lazy_commands: dict[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})
        self._plugins: dict[str, Any] | None = None

    def plugins(self) -> dict[str, Any]:
        """Entry points of the ``locus.commands`` group by name (read once, not loaded)."""
        if self._plugins is None:
            from importlib.metadata import entry_points

            self._plugins = {ep.name: ep for ep in entry_points(group="locus.commands")}
        return self._plugins

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command name: built-in, lazy (not imported until run) and ``locus.commands`` plugins."""
        return sorted(set(self.commands) | set(self.lazy_commands) | set(self.plugins()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command by name, importing a lazy command or loading a plugin only when it is run."""
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name in self.lazy_commands:
            command = _import_command(self.lazy_commands[cmd_name][0])
        elif cmd_name in self.plugins():
            ep = self.plugins()[cmd_name]
            try:
                command = ep.load()
            except Exception as exc:  # a broken optional plugin must not take the node's CLI down
                print(f"locus: command plugin {ep.name!r} ({ep.value}) not loaded: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
                return None
        else:
            return None
        self.add_command(command, name=cmd_name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the commands with their short help without importing them."""
        rows = []
        limit = formatter.width - 6 - max((len(n) for n in self.list_commands(ctx)), default=0)
        for name in self.list_commands(ctx):
            if name in self.commands:
                command = self.commands[name]
                if command.hidden:
                    continue
                text = command.get_short_help_str(limit)
            elif name in self.lazy_commands:
                text = click.Command(name, help=self.lazy_commands[name][1]).get_short_help_str(limit)
            else:
                ep = self.plugins()[name]
                text = f"(plugin {ep.value}; `locus {name} --help`)"
            rows.append((name, text))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; a database that is not ready is one line, not a traceback."""
        try:
            return super().invoke(ctx)
        except Exception as exc:
            base = sys.modules.get("node.db.base")  # imported only if the command opened a database
            if base is not None and isinstance(exc, base.DatabaseNotReady):
                raise click.ClickException(str(exc)) from exc
            raise


@click.group(cls=LazyGroup, lazy_commands=LAZY_COMMANDS)
@click.version_option(version=None, package_name="locus", prog_name="locus", message="%(prog)s %(version)s")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), envvar="LOCUS_CONFIG",
              help="TOML settings file (environment variables LOCUS_* override it).")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (default from settings).")
@click.option("--json-logs", is_flag=True, help="One JSON object per log line.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, log_level: str | None, json_logs: bool) -> None:
    """Locus: PET/CT lesion reports for your PACS."""
    from pydantic import ValidationError

    from node.logging import configure_logging
    from node.settings import ConfigFileError, LocusSettings

    try:
        settings = LocusSettings.load(config)
    except (ConfigFileError, ValidationError) as exc:
        from node.urls import mask_url

        raise click.ClickException(mask_url(f"invalid configuration: {exc}")) from exc
    configure_logging(log_level or ("WARNING" if ctx.invoked_subcommand in _QUIET else settings.log_level),
                      json_lines=json_logs)
    ctx.obj = settings


# Commands whose output is for people at a terminal: keep INFO logs out of the way.
_QUIET = {"analyse", "analyses", "results", "library", "exports", "echo", "db", "localize", "demo", "train", "review", "dataset",
          "encode-study"}


def settings_of(ctx: click.Context) -> LocusSettings:
    """The settings the root command loaded, for subcommands (one load per invocation)."""
    from node.settings import LocusSettings

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
    from node.analysis_options import model_sources, offline_analysis_options
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
