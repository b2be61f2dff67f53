"""The analysis options of the node, built in one place from the settings.

Why one function: the worker (``node.jobs``) and the offline command (``locus analyse``)
must analyse a study the same way: the same ``analysis.lesion_mode``, the same localizer
and study encoder.  When they were built twice, ``locus analyse`` passed no models and named
no sites while the node named them all.

Models are the configured ones (``models.*``).  Offline commands may fall back to the
models shipped with Locus (today the demo localizer, trained on synthetic phantoms only)
when none is configured; the node's worker does not, so a hospital deployment never
reports phantom-trained sites unless it configures them.  Either way, :class:`ModelSource`
says which model is used and where it came from.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from node.models import ModelCache, ModelHost, load_localizer, load_study_encoder, shipped_localizer_dir
from node.settings import LocusSettings
from pipelines.analysis import AnalysisOptions


@dataclass(frozen=True)
class ModelSource:
    """Which model a role uses and why (printed by the CLI, logged by the worker)."""

    role: Literal["localizer", "study encoder"]
    source: Literal["configured", "shipped", "none"]
    detail: str

    def describe(self) -> str:
        """One line for the analysis log and the SR's model notes: which role came from where."""
        return f"{self.role}: {self.detail}"


def model_sources(settings: LocusSettings, *, allow_shipped: bool) -> tuple[LocusSettings, list[ModelSource]]:
    """The settings with the models to use filled in, and a description of each choice."""
    cfg = settings.models
    sources: list[ModelSource] = []
    if cfg.localizer_checkpoint is not None:
        sources.append(ModelSource("localizer", "configured", f"{cfg.localizer_checkpoint} (from the configuration)"))
    else:
        shipped = shipped_localizer_dir() if allow_shipped else None
        if shipped is not None:
            settings = settings.model_copy(update={"models": cfg.model_copy(update={"localizer_checkpoint": shipped})})
            sources.append(ModelSource("localizer", "shipped", f"demo weights shipped in {shipped} (trained on "
                                       "synthetic phantoms only; they name phantom lesion sites and say nothing "
                                       "about patients)"))  # fmt: skip
        else:
            sources.append(ModelSource("localizer", "none", "none configured (models.localizer_checkpoint); lesion "
                                       "locations are reported as not assessed"))  # fmt: skip
    if cfg.study_encoder_checkpoint is not None:
        sources.append(ModelSource("study encoder", "configured",
                                   f"{cfg.study_encoder_checkpoint} (from the configuration)"))
    else:
        sources.append(ModelSource("study encoder", "none", "none configured (models.study_encoder_checkpoint); "
                                   "no study embedding or zero-shot findings"))  # fmt: skip
    return settings, sources


def build_analysis_options(
    host: ModelHost,
    *,
    study_version: int = 1,
    predecessor: tuple[str, str, str, str] | None = None,
    content_datetime: datetime.datetime | None = None,
    progress: Callable[[str], None] | None = None,
) -> AnalysisOptions:
    """:class:`AnalysisOptions` for ``host.settings``: lesion mode and the loaded models.

    Models load through ``host``'s per-process cache (a worker context, or a
    :class:`~node.models.ModelCache`), so they are read once per process.  Raises the
    model's :class:`~pipelines.errors.ModelError` when a configured model cannot be loaded.
    """
    settings = host.settings
    return AnalysisOptions(
        lesion_mode=settings.analysis.lesion_mode,
        study_version=study_version,
        predecessor=predecessor,
        content_datetime=content_datetime,
        localizer=load_localizer(host, progress),
        study_encoder=load_study_encoder(host),
        # The organisation UID root of the SRs this node creates (own objects are recognised by it).
        uid_prefix=f"{settings.analysis.uid_root}." if settings.analysis.uid_root else None,
    )


def offline_analysis_options(settings: LocusSettings, *, lesion_mode: str | None = None,
                             progress: Callable[[str], None] | None = None,
                             ) -> tuple[AnalysisOptions, list[ModelSource]]:  # fmt: skip
    """Options for an offline command: configured or shipped models, said which.

    ``lesion_mode`` overrides ``analysis.lesion_mode`` when given (a command-line option).
    """
    if lesion_mode is not None:
        settings = settings.model_copy(update={"analysis": settings.analysis.model_copy(
            update={"lesion_mode": lesion_mode})})  # fmt: skip
    settings, sources = model_sources(settings, allow_shipped=True)
    return build_analysis_options(ModelCache(settings), progress=progress), sources
