"""AFLoc text side: cleaning, tokenisation and the embedding aggregation.

As YH0517/AFLoc 940e3d7 does it:

* :func:`clean_prompt` — ``process_text`` (``afloc_model.py:243-330``): digit-period and
  period splitting, ``\\w+`` tokens, pieces of ≤ 1 token dropped *before* non-ASCII removal,
  pieces joined by spaces (no period survives).  A one-word prompt becomes ``""``.
* :func:`aggregate_words` / :func:`sentence_units` — ``aggregate_tokens`` and
  ``aggregate_tokens_sent_as_units`` (``text_model.py:35-106, 208-261``).
* Report embedding: mean over the 97 word positions (zeros included) per layer, then the sum
  of the last four layers — divided by 97, not by the token count (``text_model.py:108-206``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.errors import ModelError

#: ``data.text.word_num`` (``config.yaml:64``): tokens incl. [CLS] and [SEP].
MAX_TOKENS = 97
#: Hidden states summed (``text_model.py:129-135``).
LAST_N_LAYERS = 4

_NUMBERING = re.compile(r"[0-9]+\.")
_WORD = re.compile(r"\w+")  # nltk RegexpTokenizer(r"\w+") is re.findall with UNICODE


def clean_prompt(text: str) -> str:
    """The inference text cleaning of ``process_text`` (``afloc_model.py:243-330``), step by step."""
    text = text.replace("\n", " ")
    pieces = [sent for point in _NUMBERING.split(text) for sent in point.split(".")]
    kept: list[str] = []
    for piece in pieces:
        if len(piece) == 0:
            continue
        piece = piece.replace("\ufffd\ufffd", " ")
        tokens = _WORD.findall(piece.lower())
        if len(tokens) <= 1:  # checked before the ASCII filter, as upstream
            continue
        ascii_tokens = [t.encode("ascii", "ignore").decode("ascii") for t in tokens]
        kept.append(" ".join(t for t in ascii_tokens if len(t) > 0))
    return " ".join(kept)


def load_tokenizer(text_dir: str | Path) -> Any:
    """The WordPiece tokenizer from a local directory (``vocab.txt``); never downloads."""
    from transformers import AutoTokenizer

    path = Path(text_dir)
    if not (path / "vocab.txt").is_file() and not (path / "tokenizer.json").is_file():
        raise ModelError(f"text directory {path.name} has no vocab.txt/tokenizer.json", code="text_tower_missing")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(tokenizer: Any, prompts: Sequence[str], *, clean: bool = True) -> dict[str, torch.Tensor]:
    """Clean (optionally) and encode each prompt to 97 ids: truncation on, padded to ``max_length`` (``afloc_model.py:292-298``)."""
    texts = [clean_prompt(p) if clean else p for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", truncation=True, padding="max_length", max_length=MAX_TOKENS)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_type_ids": enc.get("token_type_ids", torch.zeros_like(enc["input_ids"]))}  # fmt: skip


def aggregate_words(hidden: torch.Tensor, tokens: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """Sum WordPiece pieces into words for one sample (``aggregate_tokens``).

    ``hidden`` is ``[L, T, D]`` (layers, token positions, channels); returns ``[L, T, D]`` with
    the word vectors first and zero vectors after, and the word strings padded with
    ``"[PAD]"``.  A ``##`` piece joins the pending word; any other token closes it; ``[SEP]``
    closes the pending word, is appended itself and stops the walk.
    """
    layers, length, dim = hidden.shape
    per_token = hidden.permute(1, 0, 2)  # [T, L, D]
    out: list[torch.Tensor] = []
    words: list[str] = []
    bank: list[torch.Tensor] = []
    word_bank: list[str] = []
    for vec, tok in zip(per_token, tokens):
        if tok == "[SEP]":
            if bank:
                out.append(torch.stack(bank).sum(dim=0))
                words.append("".join(word_bank))
            out.append(vec)
            words.append(tok)
            break
        if not tok.startswith("##"):
            if bank:
                out.append(torch.stack(bank).sum(dim=0))
                words.append("".join(word_bank))
            bank, word_bank = [vec], [tok]
        else:
            bank.append(vec)
            word_bank.append(tok[2:])
    agg = torch.stack(out) if out else hidden.new_zeros((0, layers, dim))
    if agg.shape[0] < length:
        agg = torch.cat([agg, hidden.new_zeros((length - agg.shape[0], layers, dim))], dim=0)
    words = words + ["[PAD]"] * (length - len(words))
    return agg[:length].permute(1, 0, 2).contiguous(), words[:length]


def sentence_units(word_vectors: torch.Tensor, words: Sequence[str]) -> torch.Tensor:
    """Sentence units of one sample (``aggregate_tokens_sent_as_units``): ``[T, D]`` → ``[T, D]``.

    Separators: positions holding ``"."`` except the one just before [SEP] (a final period
    joins the last sentence), and [SEP] itself.  Units: the [CLS] vector, the mean of the
    word vectors strictly between consecutive separators (NaN for an empty sentence, as
    measured upstream), the [SEP] vector, zero padding.
    """
    length, dim = word_vectors.shape
    try:
        sep = list(words).index("[SEP]")
    except ValueError:
        sep = length - 1
    separators = [i for i in range(1, sep) if words[i] == "." and i != sep - 1] + [sep]
    units = [word_vectors[0]]
    prev = 0
    for s in separators:
        units.append(word_vectors[prev + 1 : s].mean(dim=0))
        prev = s
    units.append(word_vectors[sep])
    out = torch.stack(units)
    if out.shape[0] < length:
        out = torch.cat([out, word_vectors.new_zeros((length - out.shape[0], dim))], dim=0)
    return out[:length]
