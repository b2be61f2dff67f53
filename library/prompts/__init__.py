"""Versioned zero-shot prompt sets for the study encoder (data files + a typed loader).

A prompt set is a JSON file beside this module: per finding a *negative* and a *positive*
class name, the templates they are put into, and the scoring protocol the checkpoint was
validated with (HLIP, arXiv 2505.21862).  Prompts are data, not code, so a site can add a set
without touching Python, and every score Locus reports names the set's ``version``.

Shipped: ``ct_rate_hlip_v1`` — the 16 CT-RATE findings HLIP v1 evaluates, paired-negative
protocol, template "The volume shows: {}.".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
PROTOCOLS = ("paired-negative-softmax",)


class PromptSetError(ValueError):
    """A prompt-set file is missing or malformed."""


@dataclass(frozen=True)
class FindingPrompt:
    id: str  # stable snake_case key (configuration thresholds are keyed by it)
    finding: str  # the reported finding name (CT-RATE label column)
    negative: str
    positive: str
    organ: str = ""


@dataclass(frozen=True)
class PromptSet:
    name: str
    version: str
    protocol: str
    templates: tuple[str, ...]
    findings: tuple[FindingPrompt, ...]
    sha256: str  # of the file's bytes

    def texts(self, finding: FindingPrompt) -> tuple[list[str], list[str]]:
        """(negative texts, positive texts), one per template."""
        return ([t.format(finding.negative) for t in self.templates], [t.format(finding.positive) for t in self.templates])


def available() -> list[str]:
    return sorted(p.stem for p in _HERE.glob("*.json"))


def read_prompt_file(name_or_path: str | Path) -> tuple[Path, bytes, Any]:
    """(path, bytes, parsed JSON) of a shipped prompt set named without suffix, or of a JSON
    file by path; one reader for every family's loader, so each hashes the bytes it parsed."""
    path = Path(name_or_path)
    if not path.suffix:
        path = _HERE / f"{name_or_path}.json"
    try:
        raw = path.read_bytes()
        return path, raw, json.loads(raw)
    except (OSError, json.JSONDecodeError) as exc:
        raise PromptSetError(f"cannot read prompt set {path}: {exc}") from exc


def load_prompt_set(name_or_path: str | Path = "ct_rate_hlip_v1") -> PromptSet:
    """Load a shipped set by name, or any prompt-set JSON file by path."""
    path, raw, data = read_prompt_file(name_or_path)
    try:
        protocol = str(data["protocol"])
        if protocol not in PROTOCOLS:
            raise PromptSetError(f"prompt set {path.name}: unknown protocol {protocol!r} (known: {PROTOCOLS})")
        templates = tuple(str(t) for t in data["templates"])
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise PromptSetError(f"prompt set {path.name}: each template needs exactly one '{{}}'")
        findings = tuple(
            FindingPrompt(id=str(f["id"]), finding=str(f["finding"]), negative=str(f["negative"]),
                          positive=str(f["positive"]), organ=str(f.get("organ", "")))
            for f in data["findings"]
        )
    except (KeyError, TypeError) as exc:
        raise PromptSetError(f"prompt set {path.name} is malformed: missing {exc}") from exc
    ids = [f.id for f in findings]
    if not findings or len(set(ids)) != len(ids):
        raise PromptSetError(f"prompt set {path.name}: finding ids must be present and unique")
    return PromptSet(
        name=str(data.get("prompt_set", path.stem)),
        version=str(data["version"]),
        protocol=protocol,
        templates=templates,
        findings=findings,
        sha256=hashlib.sha256(raw).hexdigest(),
    )
