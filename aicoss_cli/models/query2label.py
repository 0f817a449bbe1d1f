"""Query2Label (Liu et al., 2021) as the seed built it: a transformer decoder with label queries.

The seed's Q2L keeps its head parameters on the model itself (`label_emb`, `conv`,
`transformer`, `classifier`, beside `backbone`) and uses no positional encoding; the names and
the registration order here reproduce its state dict.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Query2Label(nn.Module):
    """Backbone feature map -> 1x1 conv to `hidden_dim` (256) -> `nn.Transformer` -> logits.

    The encoder (1 layer) runs over the image tokens; the decoder (2 layers) takes K learnable
    label embeddings as queries; `classifier` is one Linear from K * 256 to K, so every logit can
    look at every label's output. 8 heads, feed-forward 2048, dropout 0.1 (`nn.Transformer`
    defaults).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        num_classes: int,
        hidden_dim: int = 256,
        num_heads: int = 8,
        encoder_layers: int = 1,
        decoder_layers: int = 2,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        # Registered first: the seed's state dict starts with it.
        self.label_emb = nn.Parameter(torch.rand(1, num_classes, hidden_dim))
        self.backbone = backbone
        self.conv = nn.Conv2d(num_features, hidden_dim, 1)
        self.transformer = nn.Transformer(
            hidden_dim, num_heads, encoder_layers, decoder_layers, batch_first=True
        )
        self.classifier = nn.Linear(num_classes * hidden_dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        h = self.conv(self.backbone(images))  # (B, 256, H, W)
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, 256)
        queries = self.label_emb.expand(tokens.shape[0], -1, -1)  # (B, K, 256)
        out = self.transformer(tokens, queries)  # (B, K, 256)
        return self.classifier(out.flatten(1))
