"""The EMR risk model: token + time + patient embeddings, a small Transformer encoder, three sigmoid heads.

I/O contract (fixed; the scoring pipeline and the engines build against it):
inputs ``tokens`` int64 [batch, seq] (0 = padding), ``days_before`` float32
[batch, seq], ``age_years`` float32 [batch], ``sex`` int64 [batch] (0 unknown,
1 F, 2 M); output ``probs`` float32 [batch, 3] in head order t2d, ckd, hf.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from conf.settings import HEADS

INPUT_NAMES = ("tokens", "days_before", "age_years", "sex")
OUTPUT_NAMES = ("probs",)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    dropout: float = 0.1
    # Days are log-scaled against this horizon so 1 day and 5 years both land in [0, 1].
    max_days: float = 3650.0

    def to_dict(self) -> dict:
        return asdict(self)


class EmrRiskModel(nn.Module):
    """A patient token (age + sex) is prepended as CLS so an empty timeline still has one unmasked position."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.token_emb = nn.Embedding(config.vocab_size, d, padding_idx=0)
        # Time as a few smooth features of log-days: recency matters on a log scale (last week vs last year).
        self.time_proj = nn.Linear(4, d)
        self.age_proj = nn.Linear(2, d)
        self.sex_emb = nn.Embedding(3, d)
        self.cls = nn.Parameter(torch.zeros(d))
        layer = nn.TransformerEncoderLayer(d, config.n_heads, config.d_ff, config.dropout,
                                           batch_first=True, norm_first=True, activation="gelu")
        # Nested tensors are a fast path for eager inference only; the exporter needs the plain graph.
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.heads = nn.Linear(d, len(HEADS))
        self._log_max_days = math.log1p(config.max_days)

    def _time_features(self, days_before: torch.Tensor) -> torch.Tensor:
        x = torch.log1p(days_before.clamp(min=0.0)) / self._log_max_days
        return torch.stack([x, x * x, torch.sin(math.pi * x), torch.cos(math.pi * x)], dim=-1)

    def logits(self, tokens: torch.Tensor, days_before: torch.Tensor, age_years: torch.Tensor,
               sex: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0
        h = self.token_emb(tokens) + self.time_proj(self._time_features(days_before))
        a = age_years.unsqueeze(-1) / 100.0
        patient = self.cls + self.age_proj(torch.cat([a, a * a], dim=-1)) + self.sex_emb(sex)
        h = torch.cat([patient.unsqueeze(1), h], dim=1)
        mask = torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)
        h = self.encoder(h, src_key_padding_mask=mask)
        return self.heads(self.norm(h[:, 0]))

    def forward(self, tokens: torch.Tensor, days_before: torch.Tensor, age_years: torch.Tensor,
                sex: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(tokens, days_before, age_years, sex))
