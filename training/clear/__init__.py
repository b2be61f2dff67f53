"""Training for Locus's CLEAR slice encoder and ABMIL endpoint heads (CLEAR, Ligero et al., MICCAI 2025; docs/models/clear.md).

* :mod:`.lecl` — the LeCL contrastive loss (MoCo v3 InfoNCE plus lesion-bearing keys as
  up-weighted hard negatives; paper reading by default, code reading as an option);
* :mod:`.moco` — the MoCo v3 model and training step (momentum encoder, projector,
  predictor) and the lesion-centred / whole-slice view sampling;
* :mod:`.endpoint` — the ABMIL endpoint trainer (patient-grouped k-fold, ``pos_weight``,
  early stopping with deep-copied best weights, temperature calibration, AUROC on probabilities).

The lesion-location label mapping is library data (:mod:`library.clear_locations`).
"""
