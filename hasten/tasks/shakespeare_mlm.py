"""`shakespeare-mlm`: masked-token prediction on Shakespeare's works with a small bidirectional encoder.

The text and the split are those of the `shakespeare` task (byte tokens, windows of 128, earliest 90% train).
Training windows come unmasked, (tokens, tokens): the ``mask_schedule`` method masks each batch (BERT's
80/10/10 rule, Devlin et al. 2019) at a rate that may change over the run, and is added at a fixed 15% when no
masking schedule is listed. The test windows are masked once at 15% with a fixed seed, so every run is scored on
the same held-out masked tokens (Ankner et al. 2023 compare schedules the same way).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from hasten.tasks import shakespeare
from hasten.tasks.base import Task

BLOCK_SIZE = 128
VOCAB = 256  # byte values; the [MASK] token is id 256
TEST_RATE, TEST_SEED = 0.15, 1234
IGNORE = -100  # target of the tokens that are not scored


class MaskedLM(nn.Module):
    """Token + learned position embeddings, pre-LayerNorm encoder blocks with full (non-causal) self-attention,
    LayerNorm, a head over the 256 byte values. Input (B, T) ids in 0..256 (256 = [MASK]); output (B, T, 256)."""

    def __init__(self, vocab: int = VOCAB, block_size: int = BLOCK_SIZE, dim: int = 128, heads: int = 4,
                 layers: int = 2):
        super().__init__()
        self.vocab, self.mask_id = vocab, vocab  # read by the mask_schedule method
        self.tok, self.pos = nn.Embedding(vocab + 1, dim), nn.Embedding(block_size, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)
        for m in self.modules():  # BERT / GPT-2 initialization: N(0, 0.02), zero biases
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[-1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def masked_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the masked tokens only (targets = IGNORE elsewhere)."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


# The loss averages a varying number of terms per example (its masked tokens): the training loop weights each
# micro-batch by its share of them, so splitting a batch leaves the objective unchanged.
masked_cross_entropy.terms = lambda targets: (targets != IGNORE).flatten(1).sum(1)


def masked_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One value per example: the fraction of its masked tokens predicted right."""
    scored = targets != IGNORE
    right = ((outputs.argmax(-1) == targets) & scored).flatten(1).sum(1)
    return right / scored.flatten(1).sum(1).clamp(min=1)


@functools.lru_cache(maxsize=2)
def _load(path: str | None) -> tuple[TensorDataset, TensorDataset]:
    from hasten.methods.data import mask_tokens

    train, test = shakespeare.load(path)
    tokens = train.tensors[0]
    masked, targets = mask_tokens(test.tensors[0], TEST_RATE, VOCAB, VOCAB, torch.Generator().manual_seed(TEST_SEED))
    return TensorDataset(tokens, tokens), TensorDataset(masked, targets)


def load(path: str | None = None) -> tuple[TensorDataset, TensorDataset]:
    """(train, test): train (tokens, tokens) to be masked per batch; test (masked tokens, targets) at 15%."""
    return _load(path or None)


TASK = Task(
    name="shakespeare-mlm",
    description="Shakespeare's works, masked-token prediction, byte-level encoder (2 layers, d=128, 4 heads)",
    load=load,
    models={"encoder": lambda: MaskedLM()},
    loss=masked_cross_entropy,
    metric=masked_accuracy,
    metric_name="masked accuracy",
    defaults=dict(steps=2000, batch_size=32, lr=1e-3, optimizer="adam", momentum=0.9, weight_decay=0.01,
                  warmup=100, grad_clip=1.0, eval_every=500, checkpoint_every=500),
    available=shakespeare.available,
    size=shakespeare.TASK.size + " (test masked at 15%)",
    kind="text",
    data_hint=shakespeare.TASK.data_hint,
)
