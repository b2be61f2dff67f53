"""ItemizedCLIP's attention-pooling block, ``visual_attn`` (ItemizedCLIP, arXiv 2512.11141).

Upstream ``open_mri/my_model.py:11-57`` (MLNeurosurg/ItemizedCLIP ``d4b92e3``): three separate
LayerNorms (eps 1e-5, result cast back to the input dtype) on query, key and value, then
PyTorch ``nn.MultiheadAttention(embed_dim, 8, kdim=embed_dim, vdim=embed_dim,
batch_first=True, add_zero_attn=True)`` with biases, no dropout and nothing after its
``out_proj``.  The same PyTorch module is used here (not a re-derivation), so the arithmetic
— packed in-projection, the all-zero **null** key/value appended last after the projection,
``1/sqrt(head_dim)`` scaling, softmax over ``L + 1`` keys, head-averaged weights — is the
published one kernel for kernel.  The parameter names are the checkpoint's
(``attn.in_proj_weight``, ``attn.in_proj_bias``, ``attn.out_proj.{weight,bias}``,
``ln_{q,k,v}.{weight,bias}``), so ``visual_attn.*`` loads strictly.

The null slot is the "this finding is nowhere" option: its logit is exactly 0 and its value is
0, so attention mass on it shrinks the attended vector and does not move it.
"""

from __future__ import annotations

import torch
from torch import nn

#: Heads of the published block (``n_head`` default); head_dim = embed_dim / 8 = 64 for 512.
N_HEAD = 8
#: LayerNorm epsilon of the block (PyTorch default; 1e-6 moves scores by 3e-4, §5).
LN_EPS = 1e-5


class PureAttentionPoolingBlock(nn.Module):
    """Text-item queries attend over image patch tokens (plus the null slot)."""

    def __init__(self, context_dim: int = 512, n_head: int = N_HEAD) -> None:
        super().__init__()
        from open_clip.transformer import LayerNorm  # casts its result back to the input dtype, as upstream

        self.attn = nn.MultiheadAttention(context_dim, n_head, kdim=context_dim, vdim=context_dim, batch_first=True,
                                          add_zero_attn=True)  # fmt: skip
        self.ln_q = LayerNorm(context_dim, eps=LN_EPS)
        self.ln_k = LayerNorm(context_dim, eps=LN_EPS)
        self.ln_v = LayerNorm(context_dim, eps=LN_EPS)

    @property
    def n_head(self) -> int:
        """Number of attention heads (checked against the checkpoint)."""
        return int(self.attn.num_heads)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        output_attn_weights: bool = False,
        average_attn_weights: bool = True,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``q [B, K, C]``, ``k = v [B, L, C]`` → ``out [B, K, C]`` (and the weights).

        ``mask``: optional 0/1 ``[B·n_head, K, L]``, 1 = keep (training-time token masking,
        §8); PyTorch pads it with "keep" for the null slot, so the null slot is never masked.
        Weights: ``[B, K, L + 1]`` head-averaged (default) or ``[B, n_head, K, L + 1]``; the
        last column is the null slot.
        """
        attn_mask = None if mask is None else (mask == 0)
        out, weights = self.attn(self.ln_q(q), self.ln_k(k), self.ln_v(v), attn_mask=attn_mask,
                                 need_weights=output_attn_weights,
                                 average_attn_weights=average_attn_weights)  # fmt: skip
        if output_attn_weights:
            return out, weights
        return out
