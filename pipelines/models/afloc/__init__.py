"""AFLoc (Yang et al., arXiv 2401.02044; Nat. Biomed. Eng. 2025): annotation-free localization maps.

A ResNet-50 whose layer2 / layer3 / pooled layer4 features are aligned with the word,
sentence and report embeddings of a clinical BERT; any phrase yields a heat map.  The
reference is the published repository ``YH0517/AFLoc`` at commit 940e3d7; every module cites
the upstream code it follows:

* :mod:`.preprocess` — 8-bit conversion, OpenCV ``INTER_AREA`` resize-pad, ``2v/255 − 1`` (``eval/utils.py``, ``afloc_model.py``);
* :mod:`.text` — the reference text cleaning, 97-token WordPiece, word / sentence / report
  aggregation of the last four BERT layers (``afloc_model.py``, ``text_model.py``);
* :mod:`.model` — trunk, three embedders, text encoder, built offline (``vision_model.py``, ``text_model.py``);
* :mod:`.checkpoint` — the Lightning ``.ckpt`` read by a restricted unpickler, ``afloc.``
  renaming, strict load, sha256 (PyTorch Lightning 1.1.4 checkpoint layout);
* :mod:`.maps` — phrase → map recipe: dot product, Gaussian σ 1.5, bilinear 224, margin,
  min–max (``eval/common.py``);
* :mod:`.zeroshot` — the paper's zero-shot classification (global image vs report embeddings
  of a finding prompt and its negation; not in the published code).

See ``MODEL_CARD.md`` beside this file.
"""

#: Version of Locus's AFLoc re-implementation (bump when outputs can change).
AFLOC_IMPLEMENTATION = "locus-afloc-1.0"
AFLOC_NAME = "AFLoc-compatible annotation-free localizer"
