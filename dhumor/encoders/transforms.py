"""Image preprocessing, defined once per encoder entry so training, scoring and the demo cannot drift.

Memes carry text across the whole frame, so evaluation resizes the full image (no centre crop).
Training augmentation (albumentations) keeps the text legible: mild crops, colour and blur only,
no flips.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from dhumor.encoders.registry import EncoderEntry


def _to_tensor(arr: np.ndarray, entry: EncoderEntry) -> torch.Tensor:
    x = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(entry.mean).view(3, 1, 1)
    std = torch.tensor(entry.std).view(3, 1, 1)
    return (x - mean) / std


def resize_uint8(img: Image.Image, entry: EncoderEntry) -> np.ndarray:
    """The encoder-sized uint8 RGB array (what the decoded-image cache keeps)."""
    s = entry.image_size
    return np.asarray(img.convert("RGB").resize((s, s), Image.BICUBIC))


def eval_transform(entry: EncoderEntry):
    """PIL image or uint8 array → normalised (3, S, S) tensor."""
    def apply(img) -> torch.Tensor:
        arr = img if isinstance(img, np.ndarray) else resize_uint8(img, entry)
        return _to_tensor(arr, entry)
    return apply


def train_transform(entry: EncoderEntry):
    """Augmenting transform for fine-tuning (albumentations), then the same normalisation."""
    import albumentations as A

    s = entry.image_size
    aug = A.Compose([
        A.RandomResizedCrop(size=(s, s), scale=(0.75, 1.0), ratio=(0.8, 1.25), interpolation=cv2.INTER_CUBIC),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 3)), A.ImageCompression(quality_range=(50, 95))], p=0.3),
    ])

    def apply(img) -> torch.Tensor:
        arr = img if isinstance(img, np.ndarray) else np.asarray(img.convert("RGB"))
        return _to_tensor(aug(image=arr)["image"], entry)
    return apply
