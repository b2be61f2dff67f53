"""Training of ItemizedCLIP models (Lyu et al., arXiv 2512.11141) on Locus data.

* :mod:`.losses` — the published objectives (itemizedclip-compat.md §8);
* :mod:`.data` — phantom PET/CT studies with itemized reports, preprocessed for the whole-body variant;
* :mod:`.train` — a CPU-sized training loop writing checkpoints in the published layout.
"""
