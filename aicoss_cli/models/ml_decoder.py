"""ML-Decoder head (Ridnik et al., 2023), as the seed used it, written for current PyTorch.

The image feature map becomes tokens; a fixed set of queries cross-attends to them in one
decoder layer without self-attention; a group fully-connected layer turns each query into
`duplicate_factor` logits. Parameter names follow the seed's (`mldecoder.decoder.*`), so its
published weights load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLDecoderLayer(nn.Module):
    """One decoder step with no self-attention.

    tgt = norm1(tgt + dropout1(tgt)); tgt = norm2(tgt + dropout2(CrossAttn(tgt, memory)));
    tgt = norm3(tgt + dropout3(linear2(dropout(relu(linear1(tgt)))))).
    """

    def __init__(self, dim: int = 768, num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tgt: Tensor, memory: Tensor) -> Tensor:
        """tgt: queries (B, Q, D); memory: image tokens (B, N, D) -> (B, Q, D)."""
        tgt = self.norm1(tgt + self.dropout1(tgt))
        attended = self.multihead_attn(tgt, memory, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        fed = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(fed))


class MLDecoderCore(nn.Module):
    """The seed's `mldecoder.decoder`: query embedding, decoder layers, group-FC weights.

    Registration order gives the seed's state-dict order: duplicate_pooling(_bias), layers,
    embed_standart, query_embed.
    """

    def __init__(
        self,
        num_classes: int,
        num_features: int,
        num_queries: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        learnable_queries: bool,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.duplicate_factor = math.ceil(num_classes / num_queries)
        # Group FC: query q owns a (dim -> duplicate_factor) projection.
        self.duplicate_pooling = nn.Parameter(torch.empty(num_queries, dim, self.duplicate_factor))
        self.duplicate_pooling_bias = nn.Parameter(torch.empty(num_classes))
        self.layers = nn.ModuleList(
            MLDecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_layers)
        )
        self.embed_standart = nn.Linear(num_features, dim)  # the seed's (and ML-Decoder's) spelling
        self.query_embed = nn.Embedding(num_queries, dim)
        self.query_embed.requires_grad_(learnable_queries)
        nn.init.xavier_normal_(self.duplicate_pooling)
        nn.init.zeros_(self.duplicate_pooling_bias)


class MLDecoder(nn.Module):
    """ML-Decoder head: feature map (B, C, H, W) or tokens (B, N, C) -> logits (B, K).

    Tokens are projected to `dim` (768) by `embed_standart` + ReLU. min(100, K) queries
    cross-attend to them in one layer (8 heads, feed-forward 2048); a group FC maps every query
    to ceil(K / queries) logits and the surplus beyond K is dropped. The fixed variant
    (`learnable_queries=False`, dropout 0.1) freezes its query embedding, as the paper does; the
    seed's *learnable* variant trains it and uses dropout 0.5.
    """

    def __init__(
        self,
        num_classes: int,
        num_features: int = 2048,
        *,
        learnable_queries: bool = False,
        dropout: float | None = None,
        num_queries: int = 100,
        dim: int = 768,
        num_layers: int = 1,
        num_heads: int = 8,
        ffn_dim: int = 2048,
    ):
        super().__init__()
        if dropout is None:
            dropout = 0.5 if learnable_queries else 0.1
        self.decoder = MLDecoderCore(
            num_classes,
            num_features,
            min(num_queries, num_classes),
            dim,
            num_layers,
            num_heads,
            ffn_dim,
            dropout,
            learnable_queries,
        )

    def forward(self, features: Tensor) -> Tensor:
        core = self.decoder
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
        memory = F.relu(core.embed_standart(tokens))
        # expand, not repeat: the queries are shared by the whole batch.
        tgt = core.query_embed.weight.unsqueeze(0).expand(memory.shape[0], -1, -1)
        for layer in core.layers:
            tgt = layer(tgt, memory)
        # Group FC as one batched contraction: (B, Q, D) x (Q, D, F) -> (B, Q * F).
        logits = torch.einsum("bqd,qdf->bqf", tgt, core.duplicate_pooling).flatten(1)
        return logits[:, : core.num_classes] + core.duplicate_pooling_bias


class MLDecoderClassifier(nn.Module):
    """`backbone` (returns a feature map) + `mldecoder` head, the seed's `*_mldecoder` models."""

    def __init__(self, backbone: nn.Module, head: MLDecoder, renorm: nn.Module | None = None):
        super().__init__()
        self.renorm = renorm
        self.backbone = backbone
        self.mldecoder = head

    def forward(self, images: Tensor) -> Tensor:
        if self.renorm is not None:
            images = self.renorm(images)
        return self.mldecoder(self.backbone(images))
