"""Torch datasets and collate functions for the two training modes.

cached: each item is a meme's precomputed stream features; collate pads token sequences.
finetune: each item is a decoded (augmented) image and raw texts; collate tokenizes with each text
encoder's tokenizer, padding to the longest text in the batch (dynamic padding).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dhumor.encoders.features import StreamFeature
from dhumor.schema import MISSING, Meme, TaskSchema


def label_tensor(memes: Sequence[Meme], schema: TaskSchema) -> dict[str, torch.Tensor]:
    return {t.name: torch.tensor([m.labels.get(t.name, MISSING) for m in memes], dtype=torch.long)
            for t in schema.tasks}


class FeatureDataset(Dataset):
    """Memes with their cached stream features."""

    def __init__(self, memes: Sequence[Meme], features: Sequence[dict[str, StreamFeature | None]]):
        assert len(memes) == len(features)
        self.memes, self.features = list(memes), list(features)

    def __len__(self):
        return len(self.memes)

    def __getitem__(self, i):
        return {"index": i, "meme": self.memes[i], "features": self.features[i]}


def _pad_stream(feats: list[StreamFeature | None], dim: int, with_tokens: bool) -> dict[str, torch.Tensor]:
    b = len(feats)
    present = torch.tensor([f is not None for f in feats], dtype=torch.bool)
    pooled = torch.zeros(b, dim)
    for i, f in enumerate(feats):
        if f is not None:
            pooled[i] = torch.from_numpy(f.pooled.astype(np.float32))
    out = {"pooled": pooled, "present": present}
    if with_tokens:
        n = max([f.tokens.shape[0] for f in feats if f is not None] + [1])
        tokens = torch.zeros(b, n, dim)
        mask = torch.zeros(b, n, dtype=torch.bool)
        for i, f in enumerate(feats):
            if f is not None:
                k = f.tokens.shape[0]
                tokens[i, :k] = torch.from_numpy(f.tokens.astype(np.float32))
                mask[i, :k] = True
        out.update(tokens=tokens, mask=mask)
    return out


def feature_collate(schema: TaskSchema, dims: dict[str, int], with_tokens: bool) -> Callable:
    """Collate for :class:`FeatureDataset`: ``{"ids", "labels", "streams": {stream: tensors}}``."""
    def collate(items):
        memes = [it["meme"] for it in items]
        streams = {s: _pad_stream([it["features"].get(s) for it in items], d, with_tokens) for s, d in dims.items()}
        return {"ids": [m.id for m in memes], "labels": label_tensor(memes, schema), "streams": streams}
    return collate


class ImageTextDataset(Dataset):
    """Memes as images (decoded once, kept resized in memory) and raw texts, for end-to-end fine-tuning."""

    def __init__(self, memes: Sequence[Meme], images: Sequence[np.ndarray], transform: Callable):
        self.memes, self.images, self.transform = list(memes), list(images), transform

    def __len__(self):
        return len(self.memes)

    def __getitem__(self, i):
        m = self.memes[i]
        return {"meme": m, "pixel_values": self.transform(self.images[i]), "caption": m.caption,
                "reasoning": m.explanation}


def finetune_collate(schema: TaskSchema, tokenizers: dict[str, Callable], streams: Sequence[str],
                     max_tokens: dict[str, int]) -> Callable:
    """Collate for :class:`ImageTextDataset`: stacked pixels, dynamically padded token ids per text stream."""
    def collate(items):
        memes = [it["meme"] for it in items]
        batch: dict = {"ids": [m.id for m in memes], "labels": label_tensor(memes, schema), "inputs": {}}
        if "image" in streams:
            batch["inputs"]["image"] = {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
                                        "present": torch.ones(len(items), dtype=torch.bool)}
        for s in ("caption", "reasoning"):
            if s in streams:
                texts = [it[s] if isinstance(it[s], str) and it[s].strip() else "" for it in items]
                tok = tokenizers[s](texts, padding=True, truncation=True, max_length=max_tokens[s], return_tensors="pt")
                batch["inputs"][s] = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
                                      "present": torch.tensor([bool(t) for t in texts], dtype=torch.bool)}
        return batch
    return collate
