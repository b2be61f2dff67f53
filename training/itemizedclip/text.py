"""The demo variant's text tower: a small BERT whose vocabulary is the phantom reports' words.

The full whole-body variant uses a BiomedBERT-base directory supplied by the site (offline,
like the chest model's CXR-BERT).  The CPU demo cannot afford BERT-base, and its reports are
template sentences, so it uses a 2-layer BERT (random initialisation, trained with the rest)
over a vocabulary built from the report templates and the anatomy library's site names and
descriptions, plus single digits and ``##digit`` word pieces so any number tokenises.  The
directory is written beside the weights and travels with them (the tokenizer and the config
the checkpoint's text keys were trained with).
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from library import load_library
from training.phantom.reports import load_templates

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _basic(text: str) -> list[str]:
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")  # strip accents, as BERT uncased does
    return re.findall(r"[^\W_]+|[^\w\s]|_", text)


def report_vocabulary() -> list[str]:
    """Sorted word list of every template phrasing and library site name/description (lower-cased)."""
    t = load_templates()
    texts = [*t.normal, *t.group, *(p for pool in t.lesion.values() for p in pool), "placeholder",
             "lytic sclerotic osseous two three four five six seven eight nine"]  # fmt: skip
    for site in (*load_library().sites, *load_library().coarse):
        texts.extend((site.name, *site.descriptions))
    words: set[str] = set()
    for text in texts:
        # BERT's basic tokenizer: lower-case, split on whitespace and punctuation (placeholders dropped)
        words.update(w for w in _basic(re.sub(r"\{[a-z_]+\}", " ", text)) if not w.isdigit())
    digits = [str(d) for d in range(10)]
    return sorted(words - set(digits)) + digits + [f"##{d}" for d in digits]


def write_text_dir(path: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 2) -> Path:
    """Write ``config.json``, ``vocab.txt`` and ``tokenizer_config.json`` of the demo text tower."""
    from transformers import BertConfig

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + report_vocabulary()
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               intermediate_size=2 * hidden, max_position_embeddings=80).save_pretrained(out)  # fmt: skip
    return out
