"""When is a study complete?  Rules evaluated by a periodic sweep.

C-STORE has no end-of-study signal and a study may arrive over several associations
(PS3.4 Annex B), so "complete" is inferred.  Declaring it too early makes the
analysis see a partial series (docs/design.md F1); declaring it twice makes duplicate results
(F2).  Locus uses what the data itself says before falling back to timers:

1. ``reference_complete`` — a SEG has arrived, every image it references is present,
   and each series it references is itself complete: a PET series once it holds Number
   of Slices (0054,0081) images, any other series once quiet for ``series_quiet_s``.  A
   SEG usually references only the slices containing lesions, hence the series check.
2. ``count_complete`` — a PET series holds as many images as its Number of Slices says
   and a CT series in the same Frame of Reference has been quiet for ``series_quiet_s``.
3. ``quiet_timer`` — no new instance for ``study_quiet_s``.
4. ``force_complete`` — ``force_complete_s`` after the first instance not yet in a
   version, even if instances keep trickling in (a cap, so a chatty sender cannot stall
   the study forever; docs/design.md F3).

Rules 1 and 2 also require every other series of the study to be complete by the same
series test, so a CT still streaming in does not get cut off because the PET finished
first, and the whole study to have been quiet for ``series_quiet_s``: a sender often
follows the last PET slice with the SEG (or another series) in the same association,
milliseconds later, and a sweep landing in that gap would otherwise analyse the study
without it and report twice.  The data-driven rules thus replace the long
``study_quiet_s`` wait by the short one; they never fire while instances still stream in.
A series that starts arriving after a longer pause cannot be detected by any rule; the
versioning below handles it.

Instances a Locus node produced (``instances.origin = own``: our SR forwarded back by a
PACS) are not part of this: they never make a study pending, their series are not in
the snapshot and they are not in any version (node.db.ingest, node.db.versions).

A ready study gets a new *study version* holding every instance present, exactly once
(``repo.create_study_version``: row lock, conditional update, unique key).  Instances that
arrive later make the study pending again and the rules fire again for version n+1,
which references the SR of version n as its predecessor.  While version n is being
analysed, version n+1 waits (serialised re-runs), unless that analysis has been running
longer than ``force_complete_s`` (a stuck worker must not stall the study).  A version
still waiting for a worker is superseded instead of analysed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from node.db import repo
from node.db.models import VersionState

if TYPE_CHECKING:
    from node.db import Session
    from node.settings import CompletionSettings

log = logging.getLogger(__name__)

PET_MODALITY = "PT"
CT_MODALITY = "CT"

RULES = ("reference_complete", "count_complete", "quiet_timer", "force_complete")


@dataclass(frozen=True)
class Decision:
    """A rule that fired, and why (recorded in the audit event)."""

    rule: str
    reason: str


def _quiet(series: repo.SeriesState, now: datetime, cfg: CompletionSettings) -> bool:
    return now - series.last_received_at >= timedelta(seconds=cfg.series_quiet_s)


def _counted(series: repo.SeriesState) -> bool:
    """A PET series that holds all the images Number of Slices announces."""
    return (
        series.modality == PET_MODALITY
        and series.number_of_slices is not None
        and series.number_of_slices > 0
        and series.instance_count >= series.number_of_slices
    )


def series_complete(series: repo.SeriesState, now: datetime, cfg: CompletionSettings) -> bool:
    """PET with Number of Slices: by count; anything else: quiet for series_quiet_s."""
    if series.modality == PET_MODALITY and series.number_of_slices:
        return _counted(series)
    return _quiet(series, now, cfg)


def _reference_complete(snap: repo.StudySnapshot, now: datetime, cfg: CompletionSettings) -> Decision | None:
    segs = [seg for seg in snap.segs if seg.referenced]
    if not segs or len(segs) != len(snap.segs):
        return None  # no SEG, or a SEG whose references we do not know
    by_uid = {s.series_uid: s for s in snap.series}
    referenced_series: set[str] = set()
    for seg in segs:
        for series_uid, sop_uid in seg.referenced:
            if sop_uid not in snap.present_referenced:
                return None
            series = by_uid.get(series_uid)
            if series is None or not series_complete(series, now, cfg):
                return None
            referenced_series.add(series_uid)
    if not all(series_complete(s, now, cfg) for s in snap.series):
        return None
    return Decision(
        "reference_complete",
        f"{len(segs)} SEG(s) with all {sum(len(s.referenced) for s in segs)} referenced images present; "
        f"referenced series complete: {sorted(referenced_series)}",
    )


def _count_complete(snap: repo.StudySnapshot, now: datetime, cfg: CompletionSettings) -> Decision | None:
    pets = [s for s in snap.series if _counted(s)]
    for pet in pets:
        cts = [
            s
            for s in snap.series
            if s.modality == CT_MODALITY
            and pet.frame_of_reference_uid is not None
            and s.frame_of_reference_uid == pet.frame_of_reference_uid
            and _quiet(s, now, cfg)
        ]
        if cts and all(series_complete(s, now, cfg) for s in snap.series):
            return Decision(
                "count_complete",
                f"PET {pet.series_uid} holds {pet.instance_count}/{pet.number_of_slices} images; "
                f"CT {cts[0].series_uid} quiet for {cfg.series_quiet_s:g} s",
            )
    return None


def evaluate(snap: repo.StudySnapshot, now: datetime, cfg: CompletionSettings) -> Decision | None:
    """The first rule that declares this study complete now, or None (pure function)."""
    if snap.pending_since is None:
        return None
    if snap.latest_state == VersionState.ANALYSING.value:
        started = snap.latest_started_at
        if started is not None and now - started < timedelta(seconds=cfg.force_complete_s):
            return None  # serialise re-runs: version n+1 waits for version n
    quiet_for = now - snap.last_received_at
    if quiet_for >= timedelta(seconds=cfg.series_quiet_s):  # nothing more in the same stream
        for rule in (_reference_complete, _count_complete):
            decision = rule(snap, now, cfg)
            if decision is not None:
                return decision
    if quiet_for >= timedelta(seconds=cfg.study_quiet_s):
        return Decision("quiet_timer", f"no new instance for {quiet_for.total_seconds():.0f} s")
    pending_for = now - snap.pending_since
    if pending_for >= timedelta(seconds=cfg.force_complete_s):
        return Decision(
            "force_complete", f"instances arriving for {pending_for.total_seconds():.0f} s without a quiet period"
        )
    return None


def sweep(session: Session, now: datetime, cfg: CompletionSettings) -> list[int]:
    """Declare every study that is complete now; returns the new study version ids.

    Run periodically (``sweep_interval_s``) inside one transaction; enqueue the returned
    versions after it commits and record that with ``repo.mark_queued`` (versions left
    ``pending`` by a crash are found again with ``repo.versions_to_enqueue``).  Safe to
    run in several processes at once: a version is created by exactly one of them.
    """
    ready: list[int] = []
    for study_id in repo.pending_study_ids(session):
        snap = repo.study_snapshot(session, study_id)
        if snap is None or evaluate(snap, now, cfg) is None:
            continue
        # Re-checked under the row lock: another sweeper may have won, or an instance
        # may have arrived since the unlocked read above.
        created = repo.complete_study(session, study_id, lambda locked: evaluate(locked, now, cfg), now)
        if created is None:
            continue
        version_id, locked, decision = created
        log.info(
            "study complete: study_uid=%s version=%d rule=%s",
            locked.study_uid,
            locked.latest_version + 1,
            decision.rule,
        )
        ready.append(version_id)
    return ready
