"""The AFLoc network (AFLoc, YH0517/AFLoc 940e3d7: ``vision_model.py``, ``text_model.py``), built offline with the published key names.

Module tree = checkpoint keys after the ``afloc.`` prefix is removed (the published ``state_dict``):

* ``img_encoder.model.{conv1,bn1,layer1..4}`` — torchvision ResNet-50 (v1.5), ``fc`` replaced
  by identity (no keys), its own ``avgpool`` unused;
* ``img_encoder.global_embedder`` Linear 2048→768 (bias), ``img_encoder.local_embedder`` 1×1
  conv 1024→768 on layer3, ``img_encoder.local2_embedder`` 1×1 conv 512→768 on layer2, no
  bias; ``local_f_embedder`` is not built (``use_ce_loss`` is None upstream, ``vision_model.py``);
* ``text_encoder.model`` — ``BertModel`` (with pooler; its output is unused) from a local
  ``config.json``; eager attention (SDPA moves the report embedding by ~1e-6, measured).

The embedding width is the text config's ``hidden_size`` (768 for Bio_ClinicalBERT), so tiny
test models keep the same code path.  Nothing is L2-normalised anywhere (``vision_model.py``, ``text_model.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.errors import ModelError
from pipelines.models.afloc import text as afloc_text

#: ``Upsample(size=(299, 299), mode="bilinear", align_corners=True)`` inside the encoder (``vision_model.py``).
TRUNK_INPUT = 299


class ImageEncoder(nn.Module):
    """``ImageEncoder`` of ``vision_model.py`` for ``resnet_50``."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        from torchvision.models import resnet50

        self.model = resnet50(weights=None)  # the checkpoint supersedes ImageNet weights (MODEL_CARD.md, Weights)
        self.model.fc = nn.Identity()
        self.global_embedder = nn.Linear(2048, embed_dim)
        self.local_embedder = nn.Conv2d(1024, embed_dim, kernel_size=1, stride=1, padding=0, bias=False)
        self.local2_embedder = nn.Conv2d(512, embed_dim, kernel_size=1, stride=1, padding=0, bias=False)

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``resnet_forward``: (pooled ``[B,2048]``, layer3 ``[B,1024,19,19]``, layer2 ``[B,512,38,38]``)."""
        m = self.model
        x = F.interpolate(x, size=(TRUNK_INPUT, TRUNK_INPUT), mode="bilinear", align_corners=True)
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer1(x)
        local2 = m.layer2(x)
        local = m.layer3(local2)
        final = m.layer4(local)
        pooled = F.adaptive_avg_pool2d(final, (1, 1)).flatten(1)
        return pooled, local, local2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global ``[B,D]``, local ``[B,D,19,19]``, local2 ``[B,D,38,38]``) — ``generate_embeddings``."""
        pooled, local, local2 = self.trunk(x)
        return self.global_embedder(pooled), self.local_embedder(local), self.local2_embedder(local2)


@dataclass
class TextEmbeddings:
    """Word, sentence and report embeddings of a batch of prompts, with the words they stand for."""

    words: torch.Tensor  # [B, D, 97] word embeddings (sub-words summed, zero padded)
    sentences: torch.Tensor  # [B, D, 97] sentence units ([CLS], sentences, [SEP], zeros)
    report: torch.Tensor  # [B, D]
    word_strings: list[list[str]]


class TextEncoder(nn.Module):
    """``BertEncoder`` (``text_model.py``) with ``agg_tokens`` and ``take_sent_as_units`` on (``BertEncoder.forward``, ``text_model.py:108-206``)."""

    def __init__(self, text_dir: str | Path) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        path = Path(text_dir)
        if not (path / "config.json").is_file():
            raise ModelError(f"text directory {path.name} lacks config.json (the BERT config)", code="text_tower_missing")
        config = BertConfig.from_pretrained(str(path), local_files_only=True)
        config._attn_implementation = "eager"
        if config.num_hidden_layers + 1 < afloc_text.LAST_N_LAYERS:
            raise ModelError("the text model needs at least 3 layers (the last 4 hidden states are summed)",
                             code="text_tower_invalid")  # fmt: skip
        self.model = BertModel(config, add_pooling_layer=True)
        self.tokenizer = afloc_text.load_tokenizer(path)
        vocab = self.tokenizer.get_vocab()
        self.idxtoword = {i: w for w, i in vocab.items()}
        self.embedding_dim = int(config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> TextEmbeddings:  # fmt: skip
        """BERT hidden states → sub-words merged into words, sentence units and the report embedding (last four layers summed)."""
        out = self.model(input_ids, attention_mask, token_type_ids, output_hidden_states=True, return_dict=True)
        hidden = torch.stack(out.hidden_states[-afloc_text.LAST_N_LAYERS :], dim=1)  # [B, 4, T, D]
        words_all, sents_all, reports, strings = [], [], [], []
        for b in range(hidden.shape[0]):
            tokens = [self.idxtoword[int(i)] for i in input_ids[b]]
            agg, words = afloc_text.aggregate_words(hidden[b], tokens)  # [4, T, D]
            report = agg.mean(dim=1).sum(dim=0)  # mean over the 97 positions, then sum of layers
            word_vecs = agg.sum(dim=0)  # [T, D]
            sents = torch.stack([afloc_text.sentence_units(agg[layer], words) for layer in range(agg.shape[0])]).sum(dim=0)
            words_all.append(word_vecs.t())
            sents_all.append(sents.t())
            reports.append(report)
            strings.append(words)
        return TextEmbeddings(torch.stack(words_all), torch.stack(sents_all), torch.stack(reports), strings)


class AflocModel(nn.Module):
    """``AFLoc`` with the two encoders under the published attribute names."""

    def __init__(self, text_dir: str | Path) -> None:
        super().__init__()
        self.text_encoder = TextEncoder(text_dir)
        self.img_encoder = ImageEncoder(self.text_encoder.embedding_dim)

    @property
    def tokenizer(self) -> Any:
        """The text encoder's tokenizer, so prompts are tokenised exactly as the encoder expects."""
        return self.text_encoder.tokenizer

    def encode_image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global ``[B,D]``, local 19×19 ``[B,D,19,19]``, local2 38×38 ``[B,D,38,38]``)."""
        return self.img_encoder(x)

    def encode_text(self, prompts: list[str], *, clean: bool = True) -> TextEmbeddings:
        """Clean, tokenise and encode prompts as the published inference path does."""
        enc = afloc_text.tokenize(self.tokenizer, prompts, clean=clean)
        return self.text_encoder(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])


def build_model(text_dir: str | Path) -> AflocModel:
    """The architecture with random weights (no download: torchvision ``weights=None``, BERT from config)."""
    return AflocModel(text_dir)
