"""Positive-only prompt sets for ItemizedCLIP (arXiv 2512.11141), as versioned data.

ItemizedCLIP scores each finding with **one** positive prompt: no "No X" partner, no softmax.
The published chest-CT protocol is ``"findings consistent with " + name.lower()`` where
``name`` is the CT-RATE label or, for three findings, a synonym ("Lung nodule" → "nodules or
nodular density", "Lung opacity" → "opacity", "Bronchiectasis" → "bronchiectasis or
bronchiectatic changes").  Those strings live in ``ct_rate_itemizedclip_v1.json`` beside
this module; this loader only validates and types them, so a site can add a set (other
findings, other synonyms) without touching Python, and every score names the set's version.

The file format differs from the HLIP paired-negative sets (:mod:`library.prompts`) on
purpose: a set loaded by the wrong loader fails with a clear protocol error instead of
being scored with the wrong rule.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from library.prompts import PromptSetError, read_prompt_file

#: The only protocol this loader accepts: raw cosine of one positive prompt per finding.
PROTOCOL = "positive-only-cosine"
DEFAULT_SET = "ct_rate_itemizedclip_v1"


@dataclass(frozen=True)
class ItemPrompt:
    id: str  # stable snake_case key (configuration thresholds are keyed by it)
    finding: str  # the reported finding name (CT-RATE label column)
    name: str  # what goes into the template (the label or its published synonym)
    organ: str = ""
    rad_chestct: bool = True  # evaluated on Rad-ChestCT by upstream (Mosaic attenuation is not)


@dataclass(frozen=True)
class ItemPromptSet:
    name: str
    version: str
    protocol: str
    template: str  # exactly one "{}"; upstream has exactly one template
    lowercase: bool  # upstream lower-cases the inserted name
    findings: tuple[ItemPrompt, ...]
    sha256: str  # of the file's bytes

    def text(self, item: ItemPrompt) -> str:
        """The prompt string the text tower sees for ``item``."""
        return self.template.format(item.name.lower() if self.lowercase else item.name)

    def texts(self) -> list[str]:
        """One prompt per finding, in the set's order."""
        return [self.text(f) for f in self.findings]

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.findings]


def load_item_prompt_set(name_or_path: str | Path = DEFAULT_SET) -> ItemPromptSet:
    """Load a shipped positive-only set by name, or any such JSON file by path."""
    path, raw, data = read_prompt_file(name_or_path)
    try:
        protocol = str(data["protocol"])
        if protocol != PROTOCOL:
            raise PromptSetError(f"prompt set {path.name}: protocol {protocol!r} is not {PROTOCOL!r} "
                                 "(paired-negative sets are for the HLIP encoder)")
        templates = [str(t) for t in data["templates"]]
        if len(templates) != 1 or templates[0].count("{}") != 1:
            raise PromptSetError(f"prompt set {path.name}: the positive-only protocol has exactly one template "
                                 "with exactly one '{}'")
        findings = tuple(
            ItemPrompt(id=str(f["id"]), finding=str(f["finding"]), name=str(f["name"]), organ=str(f.get("organ", "")),
                       rad_chestct=bool(f.get("rad_chestct", True)))
            for f in data["findings"]
        )
        version = str(data["version"])
    except (KeyError, TypeError) as exc:
        raise PromptSetError(f"prompt set {path.name} is malformed: missing {exc}") from exc
    ids = [f.id for f in findings]
    if not findings or len(set(ids)) != len(ids):
        raise PromptSetError(f"prompt set {path.name}: finding ids must be present and unique")
    if any(not f.name.strip() for f in findings):
        raise PromptSetError(f"prompt set {path.name}: every finding needs a non-empty name")
    return ItemPromptSet(
        name=str(data.get("prompt_set", path.stem)),
        version=version,
        protocol=protocol,
        template=templates[0],
        lowercase=bool(data.get("lowercase", True)),
        findings=findings,
        sha256=hashlib.sha256(raw).hexdigest(),
    )
