"""Small transformers with hand-written permutation specs: a ViT and a GPT-style decoder.

Their symmetries (Ainsworth et al. 2023 treat MLPs and CNNs; the attention part follows the
same argument): one permutation ``R`` of the residual stream, shared by every layer that
writes into it (patch/token embeddings, class token, position embedding, attention and MLP
outputs, every LayerNorm); per MLP a permutation of its hidden units; per attention layer a
permutation ``H`` of the heads and, inside every head, ``QK`` of the query/key dimensions
and ``VO`` of the value dimensions (which are the output projection's inputs).

:func:`stream_only` drops the head permutations, leaving the residual stream and the MLPs.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from rebasin.spec import Grid, PermutationSpec, attention, conv, linear, norm

# Per-head permutations: ``H0``/``QK0``/``VO0`` in these specs, ``P_<layer>.heads`` (``.qk``,
# ``.vo``, ``.head_dims``) in traced ones (rebasin.trace_modules).
_HEAD_PERM = re.compile(r"^(H|QK|VO)\d*$|\.(heads|qk|vo|head_dims)$")


def is_head_perm(name: str) -> bool:
    """Whether permutation ``name`` acts on attention heads or the dimensions inside them."""
    return _HEAD_PERM.search(name) is not None


def stream_only(spec: PermutationSpec) -> PermutationSpec:
    """``spec`` without the attention-head permutations: residual stream and MLP units."""
    return spec.restrict(lambda p: not is_head_perm(p))


def _scaled(n: int, width: float) -> int:
    return max(1, int(round(n * width)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """A small Vision Transformer: ``patch x patch`` patches, a class token, learned position
    embeddings, ``depth`` pre-norm blocks, a final LayerNorm and a linear head on the class
    token. Width ``64 x width`` (a multiple of ``heads``), MLP ``2 x`` that."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        width: float = 1.0,
        depth: int = 4,
        heads: int = 4,
        patch: int = 4,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch {patch}")
        dim = heads * _scaled(64 // heads, width)
        self.dim, self.heads = dim, heads
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, 2 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])

    def permutation_spec(self) -> PermutationSpec:
        """``R``: the residual stream; per block ``i``: ``F{i}`` (MLP), ``H{i}`` (heads),
        ``QK{i}`` and ``VO{i}`` (dimensions inside every head)."""
        axes: dict = conv("patch", None, "R") | {
            "cls_token": (None, None, "R"),
            "pos_embed": (None, None, "R"),
        }
        for i in range(len(self.blocks)):
            b = f"blocks.{i}"
            axes |= norm(f"{b}.ln1", "R") | norm(f"{b}.ln2", "R")
            axes |= attention(f"{b}.attn", "R", "R", embed_dim=self.dim, num_heads=self.heads,
                              heads=f"H{i}", qk=f"QK{i}", vo=f"VO{i}")  # fmt: skip
            axes |= linear(f"{b}.fc1", "R", f"F{i}") | linear(f"{b}.fc2", f"F{i}", "R")
        return PermutationSpec(axes | norm("norm", "R") | linear("head", "R", None))


class DecoderBlock(nn.Module):
    """GPT-style causal block with separate q/k/v projections and
    ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        h = self.ln1(x)
        q, k, v = (
            proj(h).view(b, t, self.heads, e // self.heads).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, e))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT-style decoder: token and position embeddings, ``depth`` causal blocks, a
    final LayerNorm and a linear head over the vocabulary. Input: token ids ``(N, T)``."""

    def __init__(
        self, vocab: int = 64, context: int = 32, dim: int = 32, depth: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.dim, self.num_heads = dim, heads
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def permutation_spec(self) -> PermutationSpec:
        """As :meth:`ViT.permutation_spec`, with the heads on the q/k/v Linear rows."""
        grid = (self.num_heads, self.dim // self.num_heads)
        axes: dict = {"tok.weight": (None, "R"), "pos.weight": (None, "R")}
        for i in range(len(self.blocks)):
            b = f"blocks.{i}"
            qk, vo = Grid((f"H{i}", f"QK{i}"), grid), Grid((f"H{i}", f"VO{i}"), grid)
            axes |= norm(f"{b}.ln1", "R") | norm(f"{b}.ln2", "R")
            for proj, rows in (("q", qk), ("k", qk), ("v", vo)):
                axes |= {f"{b}.{proj}.weight": (rows, "R"), f"{b}.{proj}.bias": (rows,)}
            axes |= {f"{b}.proj.weight": ("R", vo), f"{b}.proj.bias": ("R",)}
            axes |= linear(f"{b}.fc1", "R", f"F{i}") | linear(f"{b}.fc2", f"F{i}", "R")
        return PermutationSpec(axes | norm("norm", "R") | linear("head", "R", None))
