"""ItemizedCLIP (Lyu et al., arXiv 2512.11141, CVPR 2026) on the HLIP chest-CT visual tower.

One visual embedding, one zero-shot score and one attention map per finding, from a single
forward of the HLIP trunk: a text-conditioned attention-pooling block (with a "nowhere"
null slot) reads every patch token.  The contract is the ItemizedCLIP paper and code (arXiv 2512.11141):

* :mod:`.head` — ``PureAttentionPoolingBlock`` (§3), exactly as published;
* :mod:`.model` — the ``ItemizedCLIP`` open_clip model sharing :mod:`pipelines.models.study_encoder`
  (trunk, config registry, offline text tower, weights-only checkpoint reading), strict
  loading of the published checkpoint layout (§4);
* :mod:`.geometry` — the token grid in patient LPS through the preprocessing's own crop geometry (§6);
* :mod:`.encoder` — the worker-facing API: every finding's score and map in one forward (§5, §6).
"""
