"""Localizer training, calibration and evaluation in HCL-AL's method (HCL-AL, Gao et al. 2025).

Stages: :mod:`.samples` builds lesion crops with the inference crop code, :mod:`.samplers`
draws HCL-AL's region-balanced batches, :mod:`.losses` has the SkipTopN contrastive loss,
:mod:`.train` runs a resumable seeded training loop, :mod:`.export` writes HCL-AL-layout
checkpoints with Locus metadata, :mod:`.calibrate` fits temperatures, :mod:`.evaluate`
and :mod:`.report` measure and plot.  ``locus train ...`` (:mod:`.cli`) drives them.
"""
