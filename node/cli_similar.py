"""``locus results similar STUDY_UID``: nearest studies by HLIP study-embedding cosine similarity."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from node.settings import LocusSettings
from node.similarity import find_similar
from pipelines.errors import InputError


@click.command("similar")
@click.argument("study_uid")
@click.option("--k", "k", default=10, show_default=True, type=click.IntRange(min=1), help="How many studies.")
@click.option("--model", "model_id", default=None, help="Model id (needed when the study has several).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def similar(ctx: click.Context, study_uid: str, k: int, model_id: str | None, as_json: bool) -> None:
    """Studies most similar to STUDY_UID (exact cosine search, same model only)."""
    # Imported here: node.cli_results attaches this command when it loads (no import cycle).
    from node.cli_results import query_database, require_study

    settings = ctx.find_object(LocusSettings)
    if settings is None:
        raise click.UsageError("no settings on the click context (run through the `locus` command)")
    database = query_database(ctx, as_json=as_json)
    try:
        with database.session(readonly=True) as session:
            require_study(session, study_uid)
            result = find_similar(session, study_uid, k=k, model_id=model_id)
    except InputError as exc:
        raise click.ClickException(f"{exc} [{exc.code}]{_why_no_embedding(settings, exc)}") from exc
    finally:
        database.dispose()
    if as_json:
        click.echo(json.dumps(asdict(result), indent=2))
        return
    click.echo(f"model {result.model_id}  preprocessing {result.preprocessing_version}  "
               f"compared {result.candidates} studies")  # fmt: skip
    if result.excluded_other_preprocessing:
        click.echo(f"({result.excluded_other_preprocessing} embeddings with another preprocessing version skipped)")
    for rank, hit in enumerate(result.results, 1):
        click.echo(f"{rank:>3}  {hit.similarity:+.4f}  {hit.study_uid}  (version {hit.version})")


def _why_no_embedding(settings: LocusSettings, exc: InputError) -> str:
    """Why a study may have no embedding: the node has no study encoder, or it has not embedded this study."""
    if exc.code != "no_embedding":
        return ""
    if settings.models.study_encoder_checkpoint is None:
        return ("; no study encoder is configured (models.study_encoder_checkpoint), so this node stores no "
                "study embeddings")
    return (f"; the configured study encoder ({settings.models.study_encoder_checkpoint.name}) has not embedded "
            "it: its analysis may be pending or failed, or the study has no CT the encoder accepts")
