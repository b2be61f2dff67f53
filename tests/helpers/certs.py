"""Test PKI made with the openssl command line: two CAs, and server/client certificates
(one from an untrusted CA, one expired) for the DICOM TLS tests (PS3.15 B.9).

openssl rather than the ``cryptography`` package: the CLI is on every CI image that has
dcmtk, and ``openssl ca -startdate/-enddate`` issues an already expired certificate.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
         "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=Locus test {name}",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    state = d / f"{name}-state"
    state.mkdir()
    (state / "index.txt").write_text("")
    (state / "serial").write_text("1000\n")
    (d / f"{name}.cnf").write_text(
        f"[ca]\ndefault_ca = ca_default\n[ca_default]\ndir = {state}\ndatabase = {state}/index.txt\n"
        f"new_certs_dir = {state}\nserial = {state}/serial\ncertificate = {d}/{name}.pem\n"
        f"private_key = {d}/{name}.key\ndefault_md = sha256\npolicy = any\ncopy_extensions = copy\n"
        "unique_subject = no\n[any]\ncommonName = supplied\n"
    )


def _issue(d: Path, ca: str, name: str, *, expired: bool = False) -> None:
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
         f"{name}.csr", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1", cwd=d)
    dates = ["-startdate", "200101000000Z", "-enddate", "200102000000Z"] if expired else ["-days", "2"]
    _run("openssl", "ca", "-batch", "-config", f"{ca}.cnf", "-in", f"{name}.csr", "-out",
         f"{name}.pem", "-notext", *dates, cwd=d)


@dataclass(frozen=True)
class Pki:
    """PEM files: ``ca`` (trusted), and key/cert pairs named server, client (from ca),
    intruder (from an untrusted CA), expired (from ca, validity in 2020)."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.root / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.root / f"{name}.key"


def make_pki(root: Path) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    _make_ca(root, "ca")
    _make_ca(root, "rogue")
    _issue(root, "ca", "server")
    _issue(root, "ca", "client")
    _issue(root, "rogue", "intruder")
    _issue(root, "ca", "expired", expired=True)
    return Pki(root)
