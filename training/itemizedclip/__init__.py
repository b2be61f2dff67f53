"""Training of ItemizedCLIP models (Lyu et al., arXiv 2512.11141) on Locus data.

* :mod:`.losses` — the published objectives (ItemizedCLIP, arXiv 2512.11141, training objectives);
* :mod:`.data` — phantom PET/CT studies with itemized reports, preprocessed for the whole-body variant;
* :mod:`.train` — a CPU-sized training loop writing checkpoints in the published layout.
"""
