"""Paired-negation prompt sets for AFLoc zero-shot classification, as versioned data.

The published AFLoc code has no classification prompts (YH0517/AFLoc 940e3d7); the shipped
``afloc_cxr_v1.json`` is Locus's reading of the paper's description (a finding prompt and its
negation, scored against the global image embedding).  This loader only validates and types
the file, and refuses any prompt the reference text cleaning would empty or truncate to one
word (``process_text``, ``afloc_model.py:243-330``: pieces of ≤ 1 word are dropped, so ``"Edema"`` encodes as ``[CLS] [SEP]``).

The format differs from the HLIP and ItemizedCLIP sets on purpose: a set loaded by the wrong
loader fails with a protocol error instead of being scored with the wrong rule.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from library.prompts import PromptSetError, read_prompt_file

PROTOCOL = "afloc-paired-negation-cosine"
DEFAULT_SET = "afloc_cxr_v1"


@dataclass(frozen=True)
class AflocFinding:
    id: str  # stable snake_case key
    finding: str  # the label name
    name: str  # what goes into the templates (lower-case words)
    organ: str = ""


@dataclass(frozen=True)
class AflocPromptSet:
    name: str
    version: str
    protocol: str
    positive_template: str
    negative_template: str
    logit_scale: float
    findings: tuple[AflocFinding, ...]
    sha256: str

    def positive(self, f: AflocFinding) -> str:
        return self.positive_template.format(f.name)

    def negative(self, f: AflocFinding) -> str:
        return self.negative_template.format(f.name)

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.findings]


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def load_afloc_prompt_set(name_or_path: str | Path = DEFAULT_SET) -> AflocPromptSet:
    """Load a shipped set by name (``afloc_*``) or any such JSON file by path."""
    path, raw, data = read_prompt_file(name_or_path)
    try:
        protocol = str(data["protocol"])
        if protocol != PROTOCOL:
            raise PromptSetError(f"prompt set {path.name}: protocol {protocol!r} is not {PROTOCOL!r}")
        pos, neg = str(data["positive_template"]), str(data["negative_template"])
        if pos.count("{}") != 1 or neg.count("{}") != 1:
            raise PromptSetError(f"prompt set {path.name}: each template needs exactly one '{{}}'")
        findings = tuple(AflocFinding(id=str(f["id"]), finding=str(f["finding"]), name=str(f["name"]),
                                      organ=str(f.get("organ", ""))) for f in data["findings"])  # fmt: skip
        scale = float(data.get("logit_scale", 10.0))
        version = str(data["version"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PromptSetError(f"prompt set {path.name} is malformed: {exc}") from exc
    ids = [f.id for f in findings]
    if not findings or len(set(ids)) != len(ids):
        raise PromptSetError(f"prompt set {path.name}: finding ids must be present and unique")
    for f in findings:
        for text in (pos.format(f.name), neg.format(f.name)):
            if "." in text or _words(text) < 2:
                raise PromptSetError(f"prompt set {path.name}: prompt {text!r} needs two or more words and no period "
                                     "(the AFLoc text cleaning drops one-word pieces)")  # fmt: skip
    return AflocPromptSet(name=str(data.get("prompt_set", path.stem)), version=version, protocol=protocol,
                          positive_template=pos, negative_template=neg, logit_scale=scale, findings=findings,
                          sha256=hashlib.sha256(raw).hexdigest())  # fmt: skip
