"""The built-in tasks' models, loss and metric.

Every layer that carries most of the weights is an ``nn.Linear`` (or a convolution), with no BatchNorm and no
dropout: examples stay independent, so per-example gradients (torch.func or the Linear-layer identity
‖gᵢ‖² = ‖xᵢ‖²‖δᵢ‖², Goodfellow 2015) are exact and training is deterministic given the seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def mlp(sizes: tuple[int, ...]) -> nn.Sequential:
    """Flatten, then Linear layers of the given widths with ReLU between them (none after the last)."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def small_cnn(in_channels: int = 1, n_classes: int = 10, side: int = 28, width: int = 32, hidden: int = 128):
    """conv(width)-pool-conv(2·width)-pool-fc(hidden)-fc(n_classes), 3×3 convolutions, ReLU, no BatchNorm."""
    flat = 2 * width * (side // 4) ** 2
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, n_classes),
    )


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2 layout, Radford et al. 2019)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        # softmax(q kᵀ/√d_head + causal mask) v  (Vaswani et al. 2017, eq. 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """Causal character (byte) language model: token + learned position embeddings, blocks, LayerNorm, head.

    Input (B, T) int64 tokens; output (B, T, vocab) logits for the next token at each position.
    """

    def __init__(self, vocab: int = 256, block_size: int = 128, dim: int = 128, heads: int = 4, layers: int = 2):
        super().__init__()
        self.block_size = block_size
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)
        self.apply(self._init)
        for block in self.blocks:  # scaled residual projections (GPT-2, Radford et al. 2019, §2.3)
            for p in (block.proj.weight, block.out.weight):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[-1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        # positions per example (not one row broadcast over the batch), so per-example gradient hooks see them
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device).expand_as(idx))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over examples, or over tokens when outputs are (B, T, V) and targets (B, T)."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One value per example: 1.0 if the top class is right; for sequences the fraction of right tokens."""
    correct = (outputs.argmax(-1) == targets).float()
    return correct.reshape(correct.shape[0], -1).mean(1)
