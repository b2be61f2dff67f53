"""``locus demo``: the whole node, end to end, on embedded defaults.

1. a data directory (temporary unless ``--data-dir``) with SQLite, the embedded broker
   and the spool;
2. a demo "PACS": a pynetdicom Storage SCP that receives the report;
3. the node (listener, sweeper, in-process worker) on a free loopback port;
4. the bundled synthetic PET/CT study with a SEG (``node/demo_study``, written by the
   phantom generator: a test instrument, not anatomy), sent over a real DICOM
   association from the PACS's AE title;
5. wait for completion, analysis and export; print the lesion table; leave the SR and
   the database in the data directory for inspection.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from node.presentation import print_lesion_table
from node.settings import LocusSettings

PACS_AE = "DEMO_PACS"
#: Synthetic PET/CT + SEG written by training/phantom (see its README); not patient data.
SAMPLE_STUDY = Path(__file__).resolve().parent / "demo_study"
#: Small localizer trained on phantom studies (``locus train demo-weights``), HCL-AL release layout.
DEMO_LOCALIZER = Path(__file__).resolve().parent / "demo_localizer"
_LOCALIZER_FILES = ("coarse/params.pth", "fine/params.pth", "anatomy_vocabulary_library.json",
                    "augmented_location_descriptions.json")


def demo_localizer_dir() -> Path | None:
    """The shipped demo localizer when all four files are present, else None."""
    return DEMO_LOCALIZER if all((DEMO_LOCALIZER / f).is_file() for f in _LOCALIZER_FILES) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_demo_pacs(inbox: Path, port: int) -> tuple[object, list[Path]]:
    """A minimal Storage SCP standing in for the hospital PACS: it files what it receives."""
    inbox.mkdir(parents=True, exist_ok=True)
    received: list[Path] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        path = inbox / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        received.append(path)
        return 0x0000

    ae = AE(ae_title=PACS_AE)
    ae.add_supported_context(Comprehensive3DSRStorage)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, received


def send_study(paths: list[Path], port: int, called_ae: str, console: Console) -> int:
    """C-STORE every file over one association, with a progress bar; returns failures."""
    ae = AE(ae_title=PACS_AE)
    for cx in AllStoragePresentationContexts[:120]:
        assert cx.abstract_syntax is not None  # pynetdicom's storage contexts all name one
        ae.add_requested_context(cx.abstract_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, max_pdu=0)
    if not assoc.is_established:
        raise click.ClickException(f"association with the node on port {port} failed")
    failures = 0
    with Progress(TextColumn("sending"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=console, transient=True) as bar:
        task = bar.add_task("send", total=len(paths))
        for p in paths:
            status = assoc.send_c_store(dcmread(p))
            if not status or status.Status != 0x0000:
                failures += 1
            bar.advance(task)
    assoc.release()
    return failures


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where to keep the database, spool and reports (default: a new temporary directory).")
@click.option("--study", "study_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Send this folder of one study's instances instead of the bundled synthetic study.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds to wait for the report.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored result as JSON.")
@click.option("--fresh", is_flag=True,
              help="Send a copy of the study with new UIDs even when the data directory already has its results.")
def demo(data_dir: Path | None, study_dir: Path | None, timeout: float, as_json: bool, fresh: bool) -> None:
    """Run the node end to end on a synthetic PET/CT study and print the lesions."""
    from node.db import open_database, repo
    from node.service import start_node
    from node.urls import mask_url

    console = Console(stderr=True, soft_wrap=True)  # paths and UIDs stay copy-pasteable
    console.print("Locus demo: about a minute in all (the node waits 10 s of quiet before it calls the study "
                  "complete, then analyses it on the CPU); the first run after an install also spends 10-30 s "
                  "importing PyTorch and loading the localizer.")
    data_dir = (data_dir or Path(tempfile.mkdtemp(prefix="locus-demo-"))).absolute()
    node_port, pacs_port = _free_port(), _free_port()
    settings = LocusSettings.load(None, **{
        "storage": {"data_dir": str(data_dir)},
        "dicom": {"host": "127.0.0.1", "port": node_port,
                  "allowed_callers": [{"ae_title": PACS_AE, "host": "127.0.0.1", "port": pacs_port}]},
        "completion": {"series_quiet_s": 2.0, "study_quiet_s": 10.0, "sweep_interval_s": 0.5},
        "export": {"destinations": [{"name": "demo-pacs", "ae_title": PACS_AE, "host": "127.0.0.1",
                                     "port": pacs_port}], "backoff_base_s": 1.0},
    })
    if settings.models.localizer_checkpoint is None:
        shipped = demo_localizer_dir()
        if shipped is not None:
            settings = settings.model_copy(update={"models": settings.models.model_copy(
                update={"localizer_checkpoint": shipped})})
            console.print(f"localizer: demo weights in {shipped} (trained on synthetic phantoms only; they name "
                          "phantom lesion sites and say nothing about patients)")
        else:
            console.print(f"localizer: none ({DEMO_LOCALIZER} is missing; recreate it with `locus train "
                          "demo-weights`); lesion locations will be reported as not assessed")
    else:
        console.print(f"localizer: {settings.models.localizer_checkpoint} (from the configuration)")
    console.print(f"data directory: {data_dir}")
    console.print(f"database: {mask_url(settings.database.url)}")
    files = sorted(p for p in (study_dir or SAMPLE_STUDY).rglob("*.dcm"))
    if not files:
        raise click.ClickException(f"no DICOM files (*.dcm) in {study_dir or SAMPLE_STUDY}")
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    # Before anything starts: an unmigrated shared database stops here with one line
    # (DatabaseNotReady), and a study this node already has is recognised; the node
    # rightly ignores instances it already stored, so sending them again would wait forever.
    database = open_database(settings.database)
    try:
        with database.session(readonly=True) as s:
            known = repo.study_detail(s, study_uid)
    finally:
        database.dispose()
    if known is not None and not fresh:
        stored = _stored_result(known)
        if stored is not None:
            console.print(f"study {study_uid} was analysed before (version {stored[0]} in this database): "
                          "showing the stored results; `--fresh` sends a copy with new UIDs")
            _print_outcome(stored[1], known, settings, data_dir, study_uid, [], console, as_json)
            return
        console.print(f"study {study_uid} is already in this database (status {known['status']}, no "
                      "results): sending a copy with new UIDs instead")
    if known is not None or fresh:
        files, study_uid = fresh_copy(files, data_dir / "demo-fresh-copies")
        console.print(f"fresh copy with new UIDs: study {study_uid}")
    pacs, received = start_demo_pacs(data_dir / "demo-pacs-inbox", pacs_port)
    node = start_node(settings)
    try:
        failures = send_study(files, node_port, settings.dicom.ae_title, console)
        console.print(f"sent {len(files)} instances to {settings.dicom.ae_title}@127.0.0.1:{node_port}"
                      + (f" ({failures} failed)" if failures else ""))
        detail = _wait_for_report(node.ctx, study_uid, received, timeout, console)
    finally:
        node.stop()
        pacs.shutdown()  # type: ignore[attr-defined]
    if detail is None:
        raise click.ClickException(f"no report within {timeout:.0f} s; see `LOCUS_DATA_DIR={data_dir} "
                                   f"{locus_command()} results show {study_uid}`")
    _print_outcome(detail["result"], detail["detail"], settings, data_dir, study_uid, received, console, as_json)


def _stored_result(detail: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """(version, result) of the newest succeeded analysis of a stored study, if any."""
    done = [v for v in detail.get("versions", []) if (v.get("analysis") or {}).get("status") == "succeeded"]
    if not done or done[-1]["analysis"].get("result") is None:
        return None
    return int(done[-1]["version"]), done[-1]["analysis"]["result"]


def _print_outcome(result: dict[str, Any], detail: dict[str, Any], settings: LocusSettings, data_dir: Path,
                   study_uid: str, received: list[Path], console: Console, as_json: bool) -> None:
    """The lesions, where the SR is, and commands that work in this shell to look further."""
    from node.urls import mask_url

    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        print_lesion_table(result)
    for r in detail.get("reports") or []:
        console.print(f"SR {r['sr_sop_uid']}: {settings.storage.reports_dir / r['path']}")
    for p in received:
        console.print(f"received by the demo PACS: {p}")
    locus = locus_command()
    console.print(f"database: {mask_url(settings.database.url)}\ninspect with:\n"
                  f"  LOCUS_DATA_DIR={data_dir} {locus} results show {study_uid}\n"
                  f"  LOCUS_DATA_DIR={data_dir} {locus} results lesions {study_uid}")


def locus_command() -> str:
    """How to call ``locus`` again from this shell: ``locus`` when it is on PATH, else the
    script as it was called (``.venv/bin/locus`` after the README's install), else this
    interpreter's script, relative to the working directory when it lies under it."""
    import os
    import shutil

    called = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    script = called if called is not None and called.name == "locus" and called.is_file() else \
        Path(sys.executable).parent / "locus"
    if not script.is_file():
        return "locus"
    on_path = shutil.which("locus")
    if on_path is not None and os.path.samefile(on_path, script):
        return "locus"
    if not script.is_absolute():
        return str(script)
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def fresh_copy(files: list[Path], out_root: Path) -> tuple[list[Path], str]:
    """Copies of one study's files with new Study, Series, SOP Instance and Frame of Reference
    UIDs, references included (the SEG's Referenced Series/Instance Sequences and the
    per-frame Derivation Image Sequence, PS3.3 C.8.20), so the node sees a new study.

    Every UI element anywhere in the data sets whose value is one of the replaced UIDs is
    rewritten; other UIDs (SOP classes, transfer syntaxes, code schemes) are left alone.
    Returns the new files and the new Study Instance UID.
    """
    from pydicom.uid import generate_uid

    datasets = [dcmread(p) for p in files]
    mapping: dict[str, str] = {}
    for ds in datasets:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            value = ds.get(keyword)
            if value and str(value) not in mapping:
                mapping[str(value)] = generate_uid(prefix=None)  # 2.25.<UUID> (PS3.5 B.2)

    def replace(_ds: Any, elem: Any) -> None:
        if elem.VR != "UI" or elem.value is None:
            return
        if elem.VM > 1:
            elem.value = [mapping.get(str(v), str(v)) for v in elem.value]
        elif str(elem.value) in mapping:
            elem.value = mapping[str(elem.value)]

    study_uid = mapping[str(datasets[0].StudyInstanceUID)]
    out_dir = out_root / study_uid
    out_dir.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for ds in datasets:
        ds.walk(replace)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out, study_uid


def _wait_for_report(ctx: object, study_uid: str, received: list[Path], timeout: float,
                     console: Console) -> dict | None:
    from node.db import repo

    deadline = time.monotonic() + timeout
    with console.status("waiting for completion, analysis and export") as status:
        while time.monotonic() < deadline:
            with ctx.db.session() as s:  # type: ignore[attr-defined]
                detail = repo.study_detail(s, study_uid)
            state = (detail or {}).get("status", "receiving")
            status.update(f"study {state}")
            analyses = [v for v in (detail or {}).get("versions", []) if v.get("analysis")]
            failed = [v for v in analyses if v["analysis"].get("status") == "failed"]
            if failed:
                a = failed[-1]["analysis"]
                raise click.ClickException(f"analysis failed ({a.get('reason_code')}): {a.get('reason')}")
            done = [v for v in analyses if v["analysis"].get("status") == "succeeded"]
            if done and received:
                return {"result": done[-1]["analysis"].get("result"), "detail": detail}
            threading.Event().wait(0.5)
    return None
