"""CLEAR-style slice embeddings and attention-MIL endpoint heads (Ligero et al., MICCAI 2025).

Re-implemented from the papers; model card docs/models/clear.md (CLEAR's own code is GPL-3.0 and was
not used):

* :mod:`.slices` — axial slices of CT and PET on one common grid (CT windows + SUV channels),
  slice index ↔ patient z;
* :mod:`.encoder` — the 2-D slice encoder (torchvision ResNet-18, built offline), its registry
  entry with the preprocessing, weights-only loading;
* :mod:`.store` — float16 per-slice embeddings as portable bytes + shape + dtype;
* :mod:`.abmil` — Ilse et al. 2018 attention-MIL heads (masked, gated or not) with a stored
  temperature.

Model card: ``docs/models/clear.md``.  Training (LeCL pretraining, endpoint heads) lives in
:mod:`training.clear`.
"""
