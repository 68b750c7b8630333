"""TCRNet: per-stream projection, cross-attention between streams, concatenation, one head per task.

Each stream (image, caption, reasoning) arrives as encoder features: a pooled vector or a token
sequence. Streams are projected to a shared width ``d_model``. In the ``pairwise`` fusion (the
paper's description) every stream attends to every other stream separately; in the ``joint``
variant (the reference code) each stream attends once over the other streams' tokens together.
The fused vector concatenates each stream's own summary with every cross-attention summary and
feeds one classification head per task of the schema.

A stream that a meme lacks (no caption, no explanation yet) is replaced by a learned
missing-stream embedding; training can drop streams at random (modality dropout) so that the
model learns to work without them.

>>> import torch
>>> from dhumor.schema import get_schema
>>> net = TCRNet(get_schema("harmeme"), {"image": 1280, "caption": 768}, TCRNetConfig(d_model=32, heads=2))
>>> x = {"image": StreamInput.pooled_only(torch.randn(4, 1280)), "caption": StreamInput.pooled_only(torch.randn(4, 768))}
>>> {k: tuple(v.shape) for k, v in net(x).items()}
{'harmful': (4, 2), 'harmfulness': (4, 3), 'target': (4, 4)}
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations
from typing import Literal

import torch
from torch import nn

from dhumor.encoders.modules import masked_mean
from dhumor.schema import TaskSchema


@dataclass
class TCRNetConfig:
    # Defaults chosen by 5-fold CV on Harm-C train (bench/tune_cv.py, bench/candidates.yaml).
    d_model: int = 128  # shared width every stream is projected to
    heads: int = 4  # attention heads in each cross-attention block
    dropout: float = 0.5
    fusion: Literal["pairwise", "joint"] = "pairwise"  # joint = the reference code's variant
    inputs: Literal["pooled", "tokens"] = "pooled"  # encoder vectors, or their token sequences
    tokens_per_stream: int = 4  # "pooled": each vector becomes this many learned tokens to attend over
    hidden: int = 128  # width of each task head's hidden layer
    modality_dropout: float = 0.1  # training only: chance to drop each present stream of a meme
    input_dropout: float = 0.1  # dropout on the raw encoder features


@dataclass
class StreamInput:
    """One stream of a batch: token features, their mask, the pooled vector, and which memes have it."""

    pooled: torch.Tensor  # (B, D)
    tokens: torch.Tensor | None = None  # (B, N, D)
    mask: torch.Tensor | None = None  # (B, N) bool
    present: torch.Tensor | None = None  # (B,) bool; None = all present

    @classmethod
    def pooled_only(cls, pooled: torch.Tensor, present: torch.Tensor | None = None) -> "StreamInput":
        return cls(pooled=pooled, present=present)

    def present_mask(self) -> torch.Tensor:
        if self.present is None:
            return torch.ones(self.pooled.shape[0], dtype=torch.bool, device=self.pooled.device)
        return self.present


class StreamProjection(nn.Module):
    """Encoder features → (B, K, d_model) tokens with a mask, plus the learned missing-stream tokens."""

    def __init__(self, in_dim: int, cfg: TCRNetConfig):
        super().__init__()
        self.inputs, self.k = cfg.inputs, cfg.tokens_per_stream
        d = cfg.d_model
        self.drop = nn.Dropout(cfg.input_dropout)
        out = d * self.k if cfg.inputs == "pooled" else d
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out))
        self.norm = nn.LayerNorm(d)
        self.type_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.missing = nn.Parameter(torch.randn(1, self.k if cfg.inputs == "pooled" else 1, d) * 0.02)

    def forward(self, x: StreamInput, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inputs == "pooled":
            b = x.pooled.shape[0]
            h = self.proj(self.drop(x.pooled.float())).view(b, self.k, -1)
            mask = torch.ones(b, self.k, dtype=torch.bool, device=h.device)
        else:
            if x.tokens is None:
                raise ValueError("TCRNet(inputs='tokens') needs token features; extract them or use inputs='pooled'")
            h = self.proj(self.drop(x.tokens.float()))
            mask = x.mask if x.mask is not None else torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        h = self.norm(h + self.type_embedding)
        # An absent stream is its learned missing embedding, all positions valid.
        p = present.view(-1, 1, 1)
        missing = self.missing.expand(h.shape[0], -1, -1)
        if missing.shape[1] != h.shape[1]:
            missing = missing[:, :1].expand(-1, h.shape[1], -1)
        h = torch.where(p, h, missing.to(h.dtype))
        mask = mask | ~present.view(-1, 1)
        return h, mask


class CrossAttentionBlock(nn.Module):
    """Queries from one stream attend to keys/values of another; residual, norm, feed-forward, pooled."""

    def __init__(self, cfg: TCRNetConfig):
        super().__init__()
        d = cfg.d_model
        self.attn = nn.MultiheadAttention(d, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, q, q_mask, kv, kv_mask) -> torch.Tensor:
        a, _ = self.attn(q, kv, kv, key_padding_mask=~kv_mask, need_weights=False)
        h = self.norm1(q + self.drop(a))
        h = self.norm2(h + self.drop(self.ff(h)))
        return masked_mean(h, q_mask)


class TCRNet(nn.Module):
    """The fusion network; ``input_dims`` maps each used stream to its encoder width."""

    def __init__(self, schema: TaskSchema, input_dims: dict[str, int], cfg: TCRNetConfig | None = None):
        super().__init__()
        if not input_dims:
            raise ValueError("TCRNet needs at least one stream")
        self.schema, self.cfg = schema, cfg or TCRNetConfig()
        self.streams = list(input_dims)
        d = self.cfg.d_model
        self.project = nn.ModuleDict({s: StreamProjection(dim, self.cfg) for s, dim in input_dims.items()})
        if self.cfg.fusion == "pairwise":
            self.pairs = [f"{a}->{b}" for a, b in permutations(self.streams, 2)]
        elif self.cfg.fusion == "joint":
            self.pairs = [f"{a}->others" for a in self.streams] if len(self.streams) > 1 else []
        else:
            raise ValueError(f"unknown fusion {self.cfg.fusion!r}; use 'pairwise' or 'joint'")
        self.cross = nn.ModuleDict({p.replace("->", "_to_"): CrossAttentionBlock(self.cfg) for p in self.pairs})
        fused = d * (len(self.streams) + len(self.pairs))
        self.fuse_norm = nn.LayerNorm(fused)
        self.heads = nn.ModuleDict({
            t.name: nn.Sequential(nn.Dropout(self.cfg.dropout), nn.Linear(fused, self.cfg.hidden), nn.GELU(),
                                  nn.Dropout(self.cfg.dropout), nn.Linear(self.cfg.hidden, t.num_classes))
            for t in schema.tasks
        })

    def _present(self, inputs: dict[str, StreamInput]) -> dict[str, torch.Tensor]:
        present = {s: inputs[s].present_mask() for s in self.streams}
        p = self.cfg.modality_dropout
        if self.training and p > 0 and len(self.streams) > 1:
            stacked = torch.stack([present[s] for s in self.streams], 1)  # (B, S)
            drop = torch.rand(stacked.shape, device=stacked.device) < p
            kept = stacked & ~drop
            # Never drop every stream of a meme: where all would go, one present stream (at random) stays.
            score = torch.rand(stacked.shape, device=stacked.device).masked_fill(~stacked, -1.0)
            one = nn.functional.one_hot(score.argmax(1), stacked.shape[1]).bool() & stacked
            kept = torch.where(kept.any(1, keepdim=True), kept, one)
            present = {s: kept[:, i] for i, s in enumerate(self.streams)}
        return present

    def fuse(self, inputs: dict[str, StreamInput]) -> torch.Tensor:
        missing = [s for s in self.streams if s not in inputs]
        if missing:
            raise KeyError(f"TCRNet expects streams {self.streams}; missing {missing} (pass them with present=False)")
        present = self._present(inputs)
        h = {s: self.project[s](inputs[s], present[s]) for s in self.streams}
        parts = [masked_mean(*h[s]) for s in self.streams]
        if self.cfg.fusion == "pairwise":
            for a, b in permutations(self.streams, 2):
                parts.append(self.cross[f"{a}_to_{b}"](h[a][0], h[a][1], h[b][0], h[b][1]))
        elif len(self.streams) > 1:
            for a in self.streams:
                others = [s for s in self.streams if s != a]
                kv = torch.cat([h[s][0] for s in others], 1)
                kv_mask = torch.cat([h[s][1] for s in others], 1)
                parts.append(self.cross[f"{a}_to_others"](h[a][0], h[a][1], kv, kv_mask))
        return self.fuse_norm(torch.cat(parts, -1))

    def forward(self, inputs: dict[str, StreamInput]) -> dict[str, torch.Tensor]:
        z = self.fuse(inputs)
        return {name: head(z) for name, head in self.heads.items()}
