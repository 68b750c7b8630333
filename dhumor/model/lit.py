"""The LightningModule: a thin shell around :class:`TCRNet` (and, when fine-tuning, the encoders).

Two modes, one module:
- ``cached``: encoders frozen outside the module; batches carry precomputed stream features.
- ``finetune``: encoders inside the module and trainable (top ``train_encoder_layers`` layers, or
  all); batches carry pixels and token ids. Use ``trainer.precision: bf16-mixed`` on a GPU.

Hyperparameters are plain values so that a ``.ckpt`` loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import CatMetric

from dhumor.encoders.registry import get_entry
from dhumor.schema import MISSING, STREAMS, TaskSchema, get_schema
from dhumor.model.metrics import compute_metrics, mean_macro_f1
from dhumor.model.tcrnet import StreamInput, TCRNet, TCRNetConfig

log = logging.getLogger("dhumor")
_NET_FIELDS = ("d_model", "heads", "dropout", "fusion", "inputs", "tokens_per_stream", "hidden", "modality_dropout",
               "input_dropout")


class DHumorModule(L.LightningModule):
    def __init__(
        self,
        task: str = "harmeme",
        streams: list[str] = list(STREAMS),
        image_encoder: str = "efficientnet-lite0",
        caption_encoder: str = "all-mpnet-base-v2",
        reasoning_encoder: str = "all-mpnet-base-v2",
        mode: Literal["cached", "finetune"] = "cached",
        inputs: Literal["pooled", "tokens"] = "pooled",
        max_tokens: int = 128,
        d_model: int = 128,
        heads: int = 4,
        dropout: float = 0.5,
        fusion: Literal["pairwise", "joint"] = "pairwise",
        tokens_per_stream: int = 4,
        hidden: int = 128,
        modality_dropout: float = 0.1,
        input_dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.05,
        encoder_lr: float = 2e-5,
        train_encoder_layers: int = -1,
        class_weights: Literal["none", "balanced"] = "balanced",
        task_weights: dict[str, float] | None = None,
        label_smoothing: float = 0.0,
        pretrained: bool = True,
        compile: bool = False,
        input_dims: dict[str, int] | None = None,
        init_from: str | None = None,
    ):
        """
        Args:
            task: task schema preset (``harmeme`` or ``dhumor``).
            streams: which of image / caption / reasoning the model uses (ablations drop some).
            image_encoder, caption_encoder, reasoning_encoder: encoder registry names.
            mode: ``cached`` (frozen encoders, features from the cache) or ``finetune`` (end to end).
            inputs: fuse pooled encoder vectors or their token sequences.
            d_model ... input_dropout: TCRNet architecture (see :class:`TCRNetConfig`).
            lr, weight_decay, warmup_ratio: AdamW and warmup-cosine schedule of the fusion network.
            encoder_lr, train_encoder_layers: fine-tune mode: encoder learning rate; how many top layers
                of each encoder train (-1 = all, 0 = frozen).
            class_weights: ``balanced`` weights each class by inverse training frequency.
            task_weights: per-task loss weights (default 1 each).
            pretrained: fine-tune mode: start encoders from pretrained weights (False = random init of
                the same architecture; for throughput benchmarks only).
            compile: ``torch.compile`` the network (GPU recipes).
            input_dims: stream widths (filled in automatically; stored so checkpoints load standalone).
            init_from: a dhumor checkpoint (directory or .ckpt) to start from: its schema, encoders,
                architecture and weights replace those above (retraining on reviewed memes).
        """
        if init_from:  # retraining: the checkpoint's architecture, not the config's (see architecture_from_checkpoint)
            a = architecture_from_checkpoint(init_from)
            task, streams, mode, inputs, max_tokens = a["task"], a["streams"], a["mode"], a["inputs"], a["max_tokens"]
            image_encoder, caption_encoder, reasoning_encoder = (a["image_encoder"], a["caption_encoder"],
                                                                 a["reasoning_encoder"])
            d_model, heads, fusion, tokens_per_stream, hidden = (a["d_model"], a["heads"], a["fusion"],
                                                                 a["tokens_per_stream"], a["hidden"])
            input_dims, pretrained = a["input_dims"], False  # every encoder weight comes from the checkpoint
        super().__init__()
        self.schema: TaskSchema = get_schema(task)
        self.stream_names = [s for s in STREAMS if s in streams]
        if not self.stream_names:
            raise ValueError(f"streams must name at least one of {STREAMS}")
        self.encoder_names = {"image": image_encoder, "caption": caption_encoder, "reasoning": reasoning_encoder}
        self.encoders = nn.ModuleDict()
        if mode == "finetune":
            self._build_encoders(pretrained, train_encoder_layers)
        if input_dims is None:
            input_dims = {s: self._stream_dim(s) for s in self.stream_names}
        input_dims = {s: int(input_dims[s]) for s in self.stream_names}
        self.save_hyperparameters()
        self.hparams["input_dims"] = input_dims
        if init_from:  # LightningCLI hands save_hyperparameters the config's values: record the effective ones
            self.hparams.update(a, pretrained=pretrained)
        cfg = TCRNetConfig(**{k: self.hparams[k] for k in _NET_FIELDS})
        self.net = TCRNet(self.schema, input_dims, cfg)
        self._init_training_state()
        if init_from:
            self._load_initial_weights(init_from)

    def _init_training_state(self) -> None:
        """Class-weight buffers (filled in ``setup``), metric collectors, and the compiled network's slot."""
        for t in self.schema.tasks:
            self.register_buffer(f"class_weight_{t.name}", torch.ones(t.num_classes), persistent=False)
        self._collectors = nn.ModuleDict({
            f"{stage}_{t.name}_{kind}": CatMetric(nan_strategy="disable")
            for stage in ("val", "test") for t in self.schema.tasks for kind in ("probs", "labels")
        })
        self.last_metrics: dict[str, dict] = {}
        self._compiled = None

    def _load_initial_weights(self, path: str) -> None:
        from dhumor.model.checkpoint import read_checkpoint
        from dhumor.errors import CheckpointError

        _, state = read_checkpoint(path)
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise CheckpointError(f"{path}: weights do not fit the model (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]})")
        self.load_state_dict(state)
        # The export records where training started, but loading it must never need the parent again.
        self.hparams["init_from"] = None
        self.hparams["parent_checkpoint"] = str(path)
        log.info("initialised from %s", path)

    # ------------------------------------------------------------ encoders (fine-tune mode)
    def _build_encoders(self, pretrained: bool, top_layers: int) -> None:
        from dhumor.encoders.modules import build_encoder

        for s in self.stream_names:
            name = self.encoder_names[s]
            if name not in self.encoders:
                enc = build_encoder(get_entry(name), pretrained=pretrained)
                _freeze_lower_layers(enc, top_layers)
                self.encoders[encoder_key(name)] = enc

    def encoder_for(self, encoder_name: str) -> nn.Module:
        """The (fine-tuned) encoder module of ``encoder_name`` held by this module."""
        return self.encoders[encoder_key(encoder_name)]

    def _stream_dim(self, stream: str) -> int:
        name = self.encoder_names[stream]
        if encoder_key(name) in self.encoders:
            return self.encoders[encoder_key(name)].entry.dim
        e = get_entry(name)
        if e.dim is None:
            from dhumor.encoders.modules import build_encoder
            return build_encoder(e, pretrained=True).entry.dim
        return e.dim

    # ------------------------------------------------------------ forward
    def stream_inputs(self, batch: dict) -> dict[str, StreamInput]:
        """Batch → TCRNet inputs: cached features as they are, or the encoders run on pixels / token ids."""
        if "streams" in batch:
            return {s: StreamInput(pooled=v["pooled"], tokens=v.get("tokens"), mask=v.get("mask"),
                                   present=v["present"]) for s, v in batch["streams"].items() if s in self.stream_names}
        out = {}
        for s in self.stream_names:
            x = batch["inputs"][s]
            enc = self.encoders[encoder_key(self.encoder_names[s])]
            o = enc(x["pixel_values"]) if s == "image" else enc(x["input_ids"], x["attention_mask"])
            out[s] = StreamInput(pooled=o.pooled, tokens=o.tokens, mask=o.mask, present=x["present"])
        return out

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        net = self._compiled if self._compiled is not None else self.net  # a Module has no truth value
        return net(self.stream_inputs(batch))

    def loss(self, logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        tw = self.hparams.task_weights or {}
        total, parts = logits[self.schema.tasks[0].name].new_zeros(()), {}
        for t in self.schema.tasks:
            y = labels[t.name]
            if not (y != MISSING).any():
                # No labelled row for this task in the batch: a zero that keeps the head in the graph,
                # so that DDP (find_unused_parameters=False) still sees a gradient for every parameter.
                total = total + logits[t.name].float().sum() * 0.0
                continue
            l = F.cross_entropy(logits[t.name].float(), y, weight=getattr(self, f"class_weight_{t.name}"),
                                ignore_index=MISSING, label_smoothing=self.hparams.label_smoothing)
            parts[t.name] = l.detach()
            total = total + tw.get(t.name, 1.0) * l
        return total, parts

    # ------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.class_weights == "balanced":
            dm = getattr(self.trainer, "datamodule", None)
            if dm is not None and hasattr(dm, "class_counts"):
                for name, counts in dm.class_counts().items():
                    c = torch.tensor(counts, dtype=torch.float)
                    w = torch.where(c > 0, c.sum() / (len(c) * c.clamp(min=1)), torch.zeros_like(c))
                    getattr(self, f"class_weight_{name}").copy_(w)
                    log.info("class weights %s: %s", name, [round(v, 3) for v in w.tolist()])
        if self.hparams.compile and self._compiled is None:
            # Kept out of the module tree (object.__setattr__), so the state dict has only ``net.*`` keys
            # and an exported checkpoint loads into an uncompiled module.
            object.__setattr__(self, "_compiled", torch.compile(self.net))

    def training_step(self, batch, batch_idx):
        logits = self(batch)
        loss, parts = self.loss(logits, batch["labels"])
        bs = len(batch["ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in parts.items():
            self.log(f"train/loss_{k}", v, batch_size=bs)
        return loss

    def _eval_step(self, batch, stage: str):
        logits = self(batch)
        loss, _ = self.loss(logits, batch["labels"])
        self.log(f"{stage}/loss", loss, batch_size=len(batch["ids"]), sync_dist=True)
        for t in self.schema.tasks:
            self._collectors[f"{stage}_{t.name}_probs"].update(logits[t.name].float().softmax(-1))
            self._collectors[f"{stage}_{t.name}_labels"].update(batch["labels"][t.name].float())

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str):
        probs, labels = {}, {}
        for t in self.schema.tasks:
            pc, lc = self._collectors[f"{stage}_{t.name}_probs"], self._collectors[f"{stage}_{t.name}_labels"]
            if pc.update_count == 0:
                return
            probs[t.name] = pc.compute().cpu().numpy().reshape(-1, t.num_classes)
            labels[t.name] = lc.compute().cpu().numpy().astype(int).reshape(-1)
            pc.reset()
            lc.reset()
        metrics = compute_metrics(self.schema, probs, labels)
        self.last_metrics[stage] = metrics
        flat = {}
        for task, m in metrics.items():
            for k in ("accuracy", "macro_f1", "weighted_f1", "auroc"):
                if m.get(k) is not None:
                    flat[f"{stage}/{task}/{k}"] = m[k]
        # CatMetric already gathered every rank's rows: the values are identical on all ranks.
        self.log_dict(flat, prog_bar=False, sync_dist=False, rank_zero_only=False)
        self.log(f"{stage}/macro_f1", mean_macro_f1(metrics), prog_bar=True)

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        logits = self(batch)
        return {"ids": batch["ids"], "probs": {k: v.float().softmax(-1).cpu() for k, v in logits.items()}}

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for n, p in self.net.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in n or "embedding" in n or "missing" in n else decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay, "lr": hp.lr},
                  {"params": no_decay, "weight_decay": 0.0, "lr": hp.lr}]
        enc = [p for p in self.encoders.parameters() if p.requires_grad]
        if enc:
            groups.append({"params": enc, "weight_decay": hp.weight_decay, "lr": hp.encoder_lr})
        fused = self.device.type == "cuda"  # one fused kernel per step instead of one per tensor
        opt = torch.optim.AdamW(groups, lr=hp.lr, fused=fused)
        trainer = self._trainer  # the public property raises when no Trainer is attached
        total = max(1, int(trainer.estimated_stepping_batches)) if trainer is not None else 1
        warm = int(total * hp.warmup_ratio)

        def schedule(step):
            if step < warm:
                return (step + 1) / max(1, warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


ARCHITECTURE = ("task", "streams", "mode", "inputs", "max_tokens", "image_encoder", "caption_encoder",
                "reasoning_encoder", "d_model", "heads", "fusion", "tokens_per_stream", "hidden", "input_dims")


def architecture_from_checkpoint(path: str) -> dict:
    """What a model started from checkpoint ``path`` must share with it: schema, streams, encoders, widths."""
    from dhumor.model.checkpoint import read_checkpoint

    meta, _ = read_checkpoint(path)
    hp = meta["hparams"]
    defaults = {"mode": "cached", "inputs": "pooled", "max_tokens": 128}
    return {k: hp.get(k, defaults.get(k)) for k in ARCHITECTURE}


def encoder_key(encoder_name: str) -> str:
    """The ``encoders`` ModuleDict key of an encoder name (ModuleDict keys may not hold ``.``)."""
    return encoder_name.replace(".", "_").replace(":", "__").replace("/", "_")


def _freeze_lower_layers(enc: nn.Module, top: int) -> None:
    """Train only the top ``top`` blocks of an encoder (-1 = everything, 0 = nothing); the encoder
    family says which its blocks are (``blocks()``) and what trains with the top ones (``head()``)."""
    if top < 0:
        return
    for p in enc.parameters():
        p.requires_grad_(False)
    if top == 0:
        return
    for layer in [*enc.blocks()[-top:], *enc.head()]:
        for p in layer.parameters():
            p.requires_grad_(True)
