"""Ingest benchmark: dcmtk storescu → Locus listener vs dcmtk storescp vs Orthanc.

Not a test (no timing assertions). It generates N synthetic CT instances (512×512,
16-bit, Explicit VR Little Endian, ~0.5 MB each), then sends them with Debian dcmtk's
``storescu`` (``TCP_NODELAY=1``: Nagle's algorithm, RFC 896, off) to three receivers on this machine,
one after another, first over one association and then over four parallel ones:

* Locus: the real listener (``node.listener.server.start_listener``) in its own
  process, with its full durability contract before each Success: file fsync, atomic
  link into the spool, directory fsync, index row committed in the results database
  (SQLite ``synchronous=FULL`` by default, ``--database-url`` for PostgreSQL), with the
  group-commit writer. Run once as one process (``locus``) and once with
  ``--listener-processes`` processes taking turns at associations (``locus-Np``);
* dcmtk ``storescp`` writing files (no fsync, no index: the upper bound);
* Orthanc (``/usr/sbin/Orthanc``, Debian 1.10.1) with a generated configuration: its
  defaults, stated explicitly: ``SyncStorageArea`` true (one fdatasync per stored file,
  checked with strace), SQLite index in WAL mode with ``synchronous=NORMAL`` (no sync on
  commit), files written in place (no temporary file, no rename, no directory fsync).
  Locus therefore does strictly more durable work per instance than Orthanc here.
  ``--sqlite-normal`` adds a Locus receiver with SQLite ``synchronous=NORMAL``
  (``locus-norm``), to measure what Locus's ``FULL`` costs.

Each receiver runs ``--rounds`` times (default 3) per association count, in an order
that rotates every round, each run on a fresh receiver and directory: the disk's speed
drifts during a run (the same receiver varied by up to 1.8x between runs here), so the
ratios compare medians. Prints instances/s and MB/s per run, the medians with their
range, the load average before and after, and the ratios Locus/Orthanc and
Locus/storescp. Usage::

    .venv/bin/python tests/benchmarks/bench_ingest.py [--count 300] [--parallel 4] [--listener-processes 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[2]
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"  # dcmtk stalls ~44 ms per instance on loopback without it
    return env


# ------------------------------------------------------------------ data


def generate_ct(out: Path, count: int, groups: int) -> list[list[Path]]:
    """``count`` CT slices split into ``groups`` series (one per parallel association)."""
    rng = np.random.default_rng(7)
    pixels = (rng.normal(40, 300, (512, 512)).clip(-1024, 3071)).astype(np.int16).tobytes()
    study, frame = generate_uid(), generate_uid()
    per = -(-count // groups)
    series_files: list[list[Path]] = []
    for g in range(groups):
        series = generate_uid()
        folder = out / f"series{g}"
        folder.mkdir(parents=True)
        files = []
        for k in range(min(per, count - g * per)):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            sop = generate_uid()
            meta.MediaStorageSOPInstanceUID = sop
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.Modality, ds.PatientName, ds.PatientID = "CT", "Bench^Ingest", "BENCH"
            ds.StudyDate = ds.SeriesDate = "20240101"
            ds.SeriesNumber, ds.InstanceNumber = g + 1, k + 1
            ds.ImagePositionPatient = [-250.0, -250.0, float(k) * 2.0]
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ds.PixelSpacing, ds.SliceThickness = [0.977, 0.977], 2.0
            ds.Rows = ds.Columns = 512
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope = 0.0, 1.0
            ds.PixelData = pixels
            path = folder / f"{k:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        series_files.append(files)
    return series_files


# ------------------------------------------------------------------ receivers


@contextmanager
def locus_receiver(
    work: Path, port: int, database_url: str | None, processes: int = 1, sync_normal: bool = False
) -> Iterator[Callable[[], int]]:
    """The Locus listener in a child process; yields a function counting indexed instances.

    Each run gets an empty index: its own SQLite file, or its own schema in a given
    PostgreSQL database (created here, dropped afterwards), so a second Locus receiver
    is not measured on resends of the first one's instances.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = None
    if database_url is None:
        url = f"sqlite:///{work / 'locus.db'}"
    elif make_url(database_url).get_backend_name() == "postgresql":
        schema = f"locus_bench_{uuid.uuid4().hex[:12]}"
        admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(database_url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    else:
        url = database_url
    log = (work / "locus.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-locus", str(port), str(work / "spool"), url,
         "--listener-processes", str(processes), *(["--sqlite-normal"] if sync_normal else [])],
        cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if "READY" not in line:
            raise RuntimeError(f"Locus listener did not start: {line} {(work / 'locus.log').read_text()[-2000:]}")

        def total() -> int:
            engine = create_engine(url)
            with engine.connect() as c:
                n = int(c.execute(text("SELECT count(*) FROM instances")).scalar_one())
            engine.dispose()
            return n

        yield total
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
        if schema is not None:
            with admin.connect() as c:
                c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


def serve_locus(port: int, spool_dir: str, url: str, processes: int, sync_normal: bool = False) -> None:
    sys.path.insert(0, str(REPO))
    from sqlalchemy import event

    from node.db.base import Database
    from node.listener.server import ListenerConfig, start_listener
    from node.storage import LocalSpool

    db = Database(url)
    if sync_normal and db.is_sqlite:
        # Measurement only (--sqlite-normal): the cost of Locus's synchronous=FULL, by
        # running this one receiver with SQLite's NORMAL (no WAL fsync per commit).
        @event.listens_for(db.engine, "connect")
        def _normal(dbapi_connection: object, _record: object) -> None:
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")  # type: ignore[attr-defined]

    db.upgrade()
    server = start_listener(
        ListenerConfig(ae_title="LOCUS", host="127.0.0.1", port=port, processes=processes),
        db,
        LocalSpool(spool_dir),
    )
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    print("READY", flush=True)
    while not stop["now"]:
        time.sleep(0.1)
    server.shutdown()


@contextmanager
def storescp_receiver(work: Path, port: int) -> Iterator[Callable[[], int]]:
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [STORESCP, "-aet", "LOCUS", "-od", str(out), str(port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield lambda: sum(1 for p in out.iterdir() if p.is_file())
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def orthanc_receiver(work: Path, port: int) -> Iterator[Callable[[], int]]:
    http = free_port()
    root = work / "orthanc"
    (root / "db").mkdir(parents=True)
    config = {
        "Name": "bench",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "DicomAet": "LOCUS",
        "DicomPort": port,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "StorageCompression": False,
        "SyncStorageArea": True,  # Orthanc's default, stated: fdatasync of every stored file
        "Plugins": [],
        "HttpServerEnabled": True,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [ORTHANC, str(root / "orthanc.json")], env=dcmtk_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        wait_port(http)

        def count() -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/statistics", timeout=10) as r:
                return int(json.load(r)["CountInstances"])

        yield count
    finally:
        proc.terminate()
        proc.wait(60)


# ------------------------------------------------------------------ sending


@dataclass
class Result:
    receiver: str
    associations: int
    instances: int
    megabytes: float
    seconds: float
    stored: int

    @property
    def per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_s(self) -> float:
        return self.megabytes / self.seconds


def send(port: int, groups: list[list[Path]]) -> float:
    """storescu, one process (= one association) per group, all at once; wall seconds."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-R", "-aet", "BENCH", "-aec", "LOCUS", "--max-pdu", "131072",
             "127.0.0.1", str(port), *map(str, files)],
            env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for files in groups
    ]
    failures = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            failures.append(f"exit {p.returncode}: {out[-300:]}")
    if failures:
        raise RuntimeError(f"storescu failed: {failures}")
    return time.perf_counter() - started


def run_one(name: str, receiver: Callable[[Path, int], object], work: Path,
            groups: list[list[Path]], round_no: int) -> Result:
    files = [f for g in groups for f in g]
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    sub = work / f"{name}-{len(groups)}-r{round_no}"
    sub.mkdir()
    for attempt in (1, 2):
        port = free_port()
        attempt_dir = sub / f"try{attempt}"
        attempt_dir.mkdir()
        try:
            with receiver(attempt_dir, port) as count:  # type: ignore[attr-defined]
                wait_port(port)
                seconds = send(port, groups)
                stored = count()
            break
        except RuntimeError as exc:  # e.g. a peer that refused an association at start-up
            if attempt == 2:
                raise
            print(f"  ({name}: {exc}; run repeated)", flush=True)
    shutil.rmtree(sub, ignore_errors=True)  # every receiver starts from the same disk state
    return Result(name, len(groups), len(files), megabytes, seconds, stored)


def median_rate(results: list[Result]) -> float:
    return float(statistics.median(r.per_s for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--database-url", default=None, help="Locus results database (default: SQLite in the temp dir)")
    parser.add_argument("--listener-processes", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes of the second Locus receiver (round-robin hand-off); 1 = skip it")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs per receiver and association count, in rotating order; medians are compared")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--sqlite-normal", action="store_true",
                        help="add a Locus receiver on SQLite synchronous=NORMAL, to measure the cost of FULL")
    parser.add_argument("--serve-locus", nargs=3, metavar=("PORT", "SPOOL", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_locus:
        serve_locus(int(args.serve_locus[0]), args.serve_locus[1], args.serve_locus[2], args.listener_processes,
                    args.sqlite_normal)
        return
    for tool in (STORESCU, STORESCP, ORTHANC):
        if not Path(tool).exists():
            sys.exit(f"{tool} is missing (Debian packages dcmtk and orthanc)")

    work = Path(tempfile.mkdtemp(prefix="locus-bench-"))
    try:
        data = work / "data"
        one = generate_ct(data / "one", args.count, 1)
        many = generate_ct(data / "many", args.count, args.parallel)
        procs = args.listener_processes
        receivers = {"locus": lambda w, p: locus_receiver(w, p, args.database_url)}
        if args.sqlite_normal:
            receivers["locus-norm"] = lambda w, p: locus_receiver(w, p, args.database_url, 1, sync_normal=True)
        if procs > 1:
            receivers[f"locus-{procs}p"] = lambda w, p: locus_receiver(w, p, args.database_url, procs)
        receivers.update({"storescp": storescp_receiver, "orthanc": orthanc_receiver})
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        results: list[Result] = []
        names = list(receivers)
        for groups in (one, many):
            for round_no in range(args.rounds):
                # Rotate the order each round: the disk's state drifts during a run
                # (measured: the same receiver varied by up to 1.8x between runs).
                shift = round_no % len(names)
                for name in names[shift:] + names[:shift]:
                    r = run_one(name, receivers[name], work, groups, round_no)
                    results.append(r)
                    print(
                        f"{r.receiver:<10} {r.associations} assoc  round {round_no + 1}  {r.instances} inst  "
                        f"{r.seconds:6.2f} s  {r.per_s:7.1f} inst/s  {r.mb_s:6.1f} MB/s  stored={r.stored}",
                        flush=True,
                    )
        print()
        print(f"medians of {args.rounds} round(s):")
        runs: dict[tuple[str, int], list[Result]] = {}
        for r in results:
            runs.setdefault((r.receiver, r.associations), []).append(r)
        for (name, n), rs in runs.items():
            rates = sorted(r.per_s for r in rs)
            print(
                f"{name:<10} {n} assoc  median {median_rate(rs):7.1f} inst/s  "
                f"{statistics.median(r.mb_s for r in rs):6.1f} MB/s  (min {rates[0]:.1f}, max {rates[-1]:.1f})"
            )
        print()
        for n in (1, args.parallel):
            orth, scp = median_rate(runs[("orthanc", n)]), median_rate(runs[("storescp", n)])
            for name in receivers:
                if name.startswith("locus"):
                    loc = median_rate(runs[(name, n)])
                    print(
                        f"{n} association(s), {name}: Locus/Orthanc = {loc / orth:.2f}, "
                        f"Locus/storescp = {loc / scp:.2f}"
                    )
        incomplete = [r for r in results if r.stored != r.instances]
        if incomplete:
            print("WARNING: not every instance was stored:", [(r.receiver, r.associations, r.stored) for r in incomplete])
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"(one machine, {os.cpu_count()} CPUs; Locus database: {args.database_url or 'SQLite'})")
    finally:
        if args.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
