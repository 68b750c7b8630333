"""Fine-tuning the top layers of the offline encoders on a CPU, from cached lower-layer states.

A full forward of MPNet-base and EfficientNet-Lite0 per training step costs ~22 s per batch of 32
here; the frozen lower layers give the same output every epoch, so they run once: their output (the
hidden states entering MPNet's top ``k`` layers, the feature map entering Lite0's top ``k`` blocks)
goes to the stage cache through :class:`~dhumor.encoders.features.FeatureExtractor` (a lower-part module and
a salt), and each step runs only the top layers and TCRNet. Issue 13's "fine-tune the offline
encoders" direction, measured by ``bench/accuracy_search.py`` (candidates ``ft_*``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from dhumor.data.datasets import _pad_stream
from dhumor.encoders.modules import EfficientNetLiteEncoder, EncoderOutput, TextEncoder, masked_mean
from dhumor.encoders.registry import get_entry
from dhumor.encoders.features import FeatureExtractor
from dhumor.model.lit import DHumorModule
from dhumor.model.tcrnet import StreamInput
from record import Recorder, refuse_subset_over_default, results_path

SALT = "bench-partial-finetune-v1"


# ---------------------------------------------------------------- the frozen lower part (cached)
class LowerMPNet(TextEncoder):
    """MPNet up to (not including) its top ``k`` layers: those hidden states are the tokens."""

    def __init__(self, name: str, k: int):
        super().__init__(get_entry(name), pretrained=True)
        self.k = k

    def forward(self, input_ids, attention_mask):
        out = self.net(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        h = out.hidden_states[len(out.hidden_states) - 1 - self.k]
        mask = attention_mask.bool()
        return EncoderOutput(h, mask, masked_mean(h, mask))


class LowerLite(EfficientNetLiteEncoder):
    """EfficientNet-Lite's stem and all but its top ``k`` blocks: that feature map is the tokens."""

    def __init__(self, name: str, k: int):
        super().__init__(get_entry(name), pretrained=True)
        self.k = k

    def forward(self, pixel_values):
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixel_values)))
        blocks = self.blocks()
        for block in blocks[:len(blocks) - self.k]:
            x = block(x)  # eval: no drop-connect
        tokens = x.flatten(2).transpose(1, 2)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens, mask, tokens.mean(1))


def lower_features(memes, stream: str, encoder: str, k: int, cache) -> list:
    """Per meme, the cached lower-part StreamFeature of ``stream`` (None when the meme has no input)."""
    lower = (LowerLite if stream == "image" else LowerMPNet)(encoder, k).eval()
    for p in lower.parameters():
        p.requires_grad_(False)
    fx = FeatureExtractor({stream: encoder}, cache, modules={encoder: lower}, salt=f"{SALT}-{stream}-top{k}",
                          progress=True)
    feats, errors = fx.extract(memes, [stream])
    if errors:
        raise SystemExit(f"{len(errors)} unusable images, e.g. {next(iter(errors.values()))}")
    return [f.get(stream) for f in feats]


# ---------------------------------------------------------------- the trainable top part
class MPNetTop(nn.Module):
    """MPNet's top ``k`` layers (pretrained), mean-pooled like all-mpnet-base-v2's sentence vector."""

    def __init__(self, name: str, k: int):
        super().__init__()
        full = TextEncoder(get_entry(name), pretrained=True).net
        self.config = full.config
        self.encoder = copy.deepcopy(full.encoder)
        self.encoder.layer = self.encoder.layer[len(self.encoder.layer) - k:]
        del full

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        att = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask.long())
        return masked_mean(self.encoder(hidden, attention_mask=att)[0], mask)


class LiteTop(nn.Module):
    """EfficientNet-Lite's top ``k`` blocks and head convolution (pretrained), mean-pooled (1280-d)."""

    def __init__(self, name: str, k: int):
        super().__init__()
        enc = EfficientNetLiteEncoder(get_entry(name), pretrained=True)
        net, blocks = enc.net, enc.blocks()
        n = len(blocks)
        self.blocks = nn.ModuleList(blocks[n - k:])
        self.rates = [net._global_params.drop_connect_rate * (n - k + i) / n for i in range(k)]
        self.conv_head, self.bn1, self.swish = net._conv_head, net._bn1, net._swish

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        side = int(round(n ** 0.5))
        x = tokens.transpose(1, 2).reshape(b, c, side, side)
        for block, rate in zip(self.blocks, self.rates):
            x = block(x, drop_connect_rate=rate if self.training else None)
        return self.swish(self.bn1(self.conv_head(x))).mean((2, 3))


class PartialFinetuneModule(DHumorModule):
    """TCRNet on pooled vectors, where the streams in ``top_layers`` are computed by trainable top layers
    of their encoder from cached lower-layer tokens (the other streams read their cached pooled vector).
    The top layers sit in ``encoders``, so they train at ``encoder_lr``."""

    def __init__(self, top_layers: dict[str, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.top_layers = dict(top_layers or {})
        for stream, k in self.top_layers.items():
            name = self.encoder_names[stream]
            self.encoders[f"top_{stream}"] = (LiteTop if stream == "image" else MPNetTop)(name, k)

    needs_tokens = True  # the batch must carry token sequences (tune_cv's loader reads this)

    def stream_inputs(self, batch: dict) -> dict[str, StreamInput]:
        out = {}
        for s, v in batch["streams"].items():
            if s not in self.stream_names:
                continue
            pooled = v["pooled"]
            if s in self.top_layers:
                pooled = self.encoders[f"top_{s}"](v["tokens"], v["mask"])
                pooled = torch.where(v["present"][:, None], pooled, torch.zeros_like(pooled))
            out[s] = StreamInput(pooled=pooled, tokens=None, mask=None, present=v["present"])
        return out


def main(argv=None):
    """Seconds per training step of each top part on real cached states (the CV's cost per epoch):
    ``python bench/partial_finetune.py --steps 5`` (DHUMOR_DATA: the Harm-C folder)."""
    import argparse
    import random
    import time

    import numpy as np

    from dhumor.cache import StageCache
    from dhumor.data.readers import read_manifest
    from dhumor.paths import data_root

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--memes", type=int, default=256,
                    help="train memes whose lower-layer states are computed (steps sample batches from them)")
    ap.add_argument("--parts", nargs="+", default=["caption:1", "caption:2", "image:1"])
    ap.add_argument("--whole-batch-size", type=int, default=32,
                    help="batch of the whole-encoder step (both encoders end to end, as configs/finetune-offline.yaml)")
    ap.add_argument("--out", default=str(results_path("partial_finetune")))
    args = ap.parse_args(argv)
    rec = Recorder("partial_finetune")
    refuse_subset_over_default(ap, args.out, results_path("partial_finetune"),
                               ["--parts"] if args.parts != ["caption:1", "caption:2", "image:1"] else [])
    rows = []
    torch.set_num_threads(2)
    all_memes = read_manifest(data_root() / "train.jsonl").memes
    memes = all_memes[: args.memes]
    cache = StageCache()
    rng = random.Random(0)
    for part in args.parts:
        stream, k = part.split(":")
        enc = "efficientnet-lite0" if stream == "image" else "all-mpnet-base-v2"
        feats = [f for f in lower_features(memes, stream, enc, int(k), cache) if f is not None]
        top = (LiteTop if stream == "image" else MPNetTop)(enc, int(k)).train()
        opt = torch.optim.AdamW(top.parameters(), lr=1e-5)
        times = []
        for step in range(args.steps + 1):
            batch = rng.sample(feats, args.batch_size)
            padded = _pad_stream(batch, batch[0].tokens.shape[1], with_tokens=True)  # what the training collate does
            t0 = time.perf_counter()
            top(padded["tokens"], padded["mask"]).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if step:  # the first step warms up allocators
                times.append(time.perf_counter() - t0)
        per = float(np.median(times))
        epoch = per * (0.8 * 0.9 * len(all_memes)) / args.batch_size  # a 5-fold training part less its 10% selection
        print(f"{part}: {per:.2f} s per step of {args.batch_size} (median of {args.steps}), "
              f"≈ {epoch / 60:.1f} min per CV epoch of the top part alone", flush=True)
        rows.append({"part": part, "batch_size": args.batch_size, "seconds_per_step": round(per, 3),
                     "minutes_per_cv_epoch": round(epoch / 60, 2), "steps": args.steps})
    whole = whole_encoder_step(memes[: args.whole_batch_size], steps=max(1, min(args.steps, 3)))
    print(f"whole encoders: {whole['seconds_per_step']:.1f} s per step of {whole['batch_size']}", flush=True)
    rec.write({"torch_threads": torch.get_num_threads(), "top_parts": rows, "whole_encoders": whole}, args.out)


def whole_encoder_step(memes, steps: int) -> dict:
    """Seconds per training step (forward + backward + AdamW) through both whole encoders, Lite0 on the
    images and MPNet on the captions of ``memes``: what fine-tuning without cached lower layers pays."""
    import time

    import numpy as np

    from dhumor.encoders.transforms import eval_transform
    from dhumor.images import load_image

    lite = EfficientNetLiteEncoder(get_entry("efficientnet-lite0"), pretrained=True).train()
    mpnet = TextEncoder(get_entry("all-mpnet-base-v2"), pretrained=True).train()
    tf = eval_transform(lite.entry)
    pixels = torch.stack([tf(load_image(m.image)) for m in memes])
    tokens = mpnet.tokenize([m.caption or "" for m in memes])
    opt = torch.optim.AdamW([*lite.parameters(), *mpnet.parameters()], lr=1e-5)
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        loss = lite(pixels).pooled.pow(2).mean() + mpnet(tokens["input_ids"], tokens["attention_mask"]).pooled.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step:  # the first step warms up allocators
            times.append(time.perf_counter() - t0)
    return {"batch_size": len(memes), "seconds_per_step": round(float(np.median(times)), 2), "steps": steps}


if __name__ == "__main__":
    main()
