"""Unfamiliarity: how unlike the training memes a meme is, from what the model already computes.

The score reads the frozen encoder features of each stream and TCRNet's fused vector (both come
out of the one forward pass; nothing extra runs). Higher = less familiar. Methods:

- ``knn_streams``: distance to the k-th nearest training meme (k = 10, at most 1% of them), where similarity is the mean over
  streams of the cosine similarity of the (train-mean-centred) encoder vectors; a stream a meme
  lacks (no caption) counts as similarity 0, since every training meme has both streams.
- ``knn_fused``: cosine distance to the k-th nearest training meme in the fused vector.
- ``mahalanobis``: the smallest Mahalanobis distance of the fused vector to a class mean of the
  primary task, one shared covariance (Ledoit-Wolf shrinkage; Lee et al. 2018).
- ``energy``: ``-logsumexp`` of the primary task's logits (Liu et al. 2020); no statistics.

Reference statistics are fitted on the training split at export and travel in the checkpoint as
``ood.safetensors`` (no pickle); the method, ``k`` and the threshold in ``dhumor.json`` (``ood``).
The threshold is the score quantile of the held-out selection split of train that leaves 5% of it
unfamiliar. Search is exact (a matrix product over the training memes): at Harm-C's size that is
well under a millisecond per meme; past about a million training memes use an approximate index
(FAISS or hnswlib) instead.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> two_kinds = np.repeat(np.eye(8)[:2], 100, 0) + rng.normal(scale=0.1, size=(200, 8))  # training memes
>>> train = Embeddings(fused=two_kinds, streams={"image": two_kinds}, present={"image": np.ones(200, bool)},
...                    logits=rng.normal(size=(200, 2)))
>>> s = OODScorer.fit("knn_streams", train, k=5)
>>> other = np.eye(8)[[5]] * 3  # a third kind
>>> far = Embeddings(fused=other, streams={"image": other}, present={"image": np.ones(1, bool)}, logits=np.zeros((1, 2)))
>>> bool(s.score(far)[0] > s.score(train).max())
True
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from dhumor.errors import CheckpointError

log = logging.getLogger("dhumor")

METHODS = ("knn_streams", "knn_fused", "mahalanobis", "energy")
DEFAULT_METHOD = "mahalanobis"  # best mean AUROC on constructed shifts vs the held-out split (bench/ood_eval.py)
DEFAULT_K = 10
UNFAMILIAR_SHARE = 0.05  # share of the held-out selection split called unfamiliar at export
UNCERTAIN_COVERAGE = 0.8  # the confidence-abstention preset decides on this share of the held-out split
OOD_FILE = "ood.safetensors"
_QUANTILES = (0.5, 0.8, 0.9, 0.95, 0.975, 0.99)


@dataclass
class Embeddings:
    """What the model computed for N memes: fused vectors, per-stream encoder vectors (zeros where
    absent), which streams each meme has, and the primary task's logits."""

    fused: np.ndarray  # (N, F)
    streams: dict[str, np.ndarray]  # stream -> (N, D_s)
    present: dict[str, np.ndarray]  # stream -> (N,) bool
    logits: np.ndarray  # (N, C) primary task, uncalibrated
    labels: np.ndarray | None = None  # (N,) primary task labels (fitting only)

    def __len__(self) -> int:
        return len(self.fused)

    @classmethod
    def concat(cls, parts: Iterable["Embeddings"]) -> "Embeddings":
        parts = list(parts)
        if not parts:
            return cls(np.zeros((0, 0), np.float32), {}, {}, np.zeros((0, 0), np.float32))
        names = list(parts[0].streams) if parts else []
        lab = [p.labels for p in parts]
        return cls(np.concatenate([p.fused for p in parts]),
                   {s: np.concatenate([p.streams[s] for p in parts]) for s in names},
                   {s: np.concatenate([p.present[s] for p in parts]) for s in names},
                   np.concatenate([p.logits for p in parts]),
                   np.concatenate(lab) if parts and all(x is not None for x in lab) else None)

    def take(self, idx) -> "Embeddings":
        return Embeddings(self.fused[idx], {s: v[idx] for s, v in self.streams.items()},
                          {s: v[idx] for s, v in self.present.items()}, self.logits[idx],
                          None if self.labels is None else self.labels[idx])


def forward_embed(module, batch: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The module's logits per task (exactly ``module(batch)`` in eval mode) and what the score
    reads: ``{"fused": (B, F), "streams": {s: (B, D)}, "present": {s: (B,)}}``."""
    inputs = module.stream_inputs(batch)
    net = module.net
    z = net.fuse(inputs)
    logits = {name: head(z) for name, head in net.heads.items()}
    streams, present = {}, {}
    for s in net.streams:
        x = inputs[s]
        pres = x.present_mask()
        streams[s] = x.pooled.float() * pres.unsqueeze(-1)
        present[s] = pres
    return logits, {"fused": z.float(), "streams": streams, "present": present}


def to_embeddings(raw: dict, logits: torch.Tensor, labels: torch.Tensor | None = None) -> Embeddings:
    """:func:`forward_embed`'s tensors (one batch) as numpy :class:`Embeddings`."""
    return Embeddings(raw["fused"].detach().cpu().numpy(),
                      {s: v.detach().cpu().numpy() for s, v in raw["streams"].items()},
                      {s: v.detach().cpu().numpy().astype(bool) for s, v in raw["present"].items()},
                      logits.detach().float().cpu().numpy(),
                      None if labels is None else labels.detach().cpu().numpy())


@torch.no_grad()
def collect_embeddings(module, loader, state: dict | None = None) -> Embeddings:
    """Embeddings (with primary labels) of a loader's batches; with ``state``, under those weights,
    the module's own weights and train/eval mode restored afterwards."""
    from lightning.pytorch.utilities import move_data_to_device

    backup = {k: v.detach().clone() for k, v in module.state_dict().items()} if state is not None else None
    was_training = module.training
    if state is not None:
        module.load_state_dict(state)
    module.eval()
    primary = module.schema.primary
    parts = []
    try:
        for batch in loader:
            batch = move_data_to_device(batch, module.device)
            logits, raw = forward_embed(module, batch)
            parts.append(to_embeddings(raw, logits[primary], batch["labels"][primary]))
    finally:
        if backup is not None:
            module.load_state_dict(backup)
        module.train(was_training)
    return Embeddings.concat(parts)


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]


@dataclass
class OODScorer:
    """Reference statistics of one method and the threshold above which a meme is unfamiliar."""

    method: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    k: int = DEFAULT_K
    threshold: float | None = None
    info: dict = field(default_factory=dict)  # where it was fitted, held-out quantiles

    # ------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, method: str, train: Embeddings, k: int = DEFAULT_K) -> "OODScorer":
        """Reference statistics of ``method`` from the training memes' embeddings."""
        if method not in METHODS:
            raise ValueError(f"unknown unfamiliarity method {method!r}; one of {list(METHODS)}")
        t: dict[str, np.ndarray] = {}
        n = len(train)
        if method == "knn_streams":
            for s, v in train.streams.items():
                p = train.present[s]
                t[f"mean.{s}"] = (v[p].mean(0) if p.any() else np.zeros(v.shape[1])).astype(np.float32)
            t["bank"] = cls._stream_view(train, t).astype(np.float16)
        elif method == "knn_fused":
            t["bank"] = _unit(train.fused).astype(np.float16)
        elif method == "mahalanobis":
            from sklearn.covariance import LedoitWolf

            y = train.labels if train.labels is not None else np.zeros(n, int)
            classes = [c for c in np.unique(y) if c >= 0]
            means = np.stack([train.fused[y == c].mean(0) for c in classes])
            centred = np.concatenate([train.fused[y == c] - means[i] for i, c in enumerate(classes)])
            lw = LedoitWolf(assume_centered=True).fit(centred)
            t["means"] = means.astype(np.float32)
            t["precision"] = lw.precision_.astype(np.float32)
        # k at most 1% of the training memes: on a tiny training set the 10th neighbour is already in
        # another cluster, and every meme would look unfamiliar.
        k = max(1, min(k, n // 100)) if method.startswith("knn") else k
        return cls(method, t, k=k, info={"n_train": n})

    @staticmethod
    def _stream_view(e: Embeddings, t: Mapping[str, np.ndarray]) -> np.ndarray:
        """Per stream: centred, unit length, zero when absent; concatenated and scaled by 1/sqrt(S)
        so that a dot product with a training meme is the mean per-stream cosine similarity."""
        # Sorted: a safetensors file gives its tensors back in name order, not in the order they were fitted.
        names = sorted(k.removeprefix("mean.") for k in t if k.startswith("mean."))
        parts = []
        for s in names:
            u = _unit(e.streams[s].astype(np.float32) - t[f"mean.{s}"])
            parts.append(u * e.present[s][:, None])
        return np.concatenate(parts, 1) / np.sqrt(len(names))

    def set_threshold(self, held_out: Embeddings, share: float = UNFAMILIAR_SHARE, split: str = "") -> float:
        """Threshold leaving ``share`` of ``held_out`` (in-domain memes never seen in fitting) above it."""
        s = self.score(held_out)
        self.threshold = float(np.quantile(s, 1.0 - share))
        self.info.update(threshold_split=split, n_threshold=len(s), unfamiliar_share_target=share,
                         held_out_quantiles={str(q): round(float(np.quantile(s, q)), 6) for q in _QUANTILES})
        return self.threshold

    # ------------------------------------------------------------ scoring
    def score(self, e: Embeddings) -> np.ndarray:
        """Unfamiliarity per meme (higher = less familiar)."""
        t = self.tensors
        if self.method == "energy":
            return -_logsumexp(np.asarray(e.logits, np.float64))
        if self.method == "mahalanobis":
            d = e.fused.astype(np.float32)[:, None, :] - t["means"][None]  # (N, C, F)
            # One BLAS product (einsum over three operands was ~5x slower; a torch product measured
            # slower for a single meme on the shared CPU).
            m = ((d @ t["precision"]) * d).sum(-1)
            return m.min(1).astype(np.float64)
        q = self._stream_view(e, t) if self.method == "knn_streams" else _unit(e.fused.astype(np.float32))
        if "_bank32" not in self.info:  # the float16 bank widened once, not per call
            self.info["_bank32"] = torch.from_numpy(t["bank"].astype(np.float32))
        bank = self.info["_bank32"]
        sim = torch.from_numpy(q.astype(np.float32)) @ bank.T  # (N, n_train): exact search
        kth = sim.topk(min(self.k, bank.shape[0]), dim=1).values[:, -1]
        return (1.0 - kth).double().numpy()

    def decide(self, scores: np.ndarray, threshold: float | None = None) -> list[dict]:
        """``{"score", "unfamiliar"}`` per meme at ``threshold`` (default: the fitted one)."""
        th = self.threshold if threshold is None else threshold
        return [{"score": round(float(s), 6), "unfamiliar": bool(th is not None and s > th)} for s in scores]

    # ------------------------------------------------------------ storage
    def to_bytes(self) -> bytes:
        """The reference statistics as a safetensors file (empty dict for ``energy``)."""
        from safetensors.numpy import save

        return save({k: np.ascontiguousarray(v) for k, v in self.tensors.items()}, metadata={"method": self.method})

    def meta(self, nbytes: int | None = None) -> dict:
        """``dhumor.json``'s ``ood`` entry."""
        info = {k: v for k, v in self.info.items() if not k.startswith("_")}
        out = {"method": self.method, "threshold": self.threshold, "file": OOD_FILE if self.tensors else None,
               "bytes": nbytes, **info}
        if self.method.startswith("knn"):
            out["k"] = self.k
        return out

    @classmethod
    def load(cls, checkpoint: str | Path, meta: Mapping) -> "OODScorer":
        """The scorer a checkpoint's ``ood`` entry describes (its statistics from ``ood.safetensors``
        beside the weights, or in the run's export folder for a Lightning ``.ckpt``)."""
        m = dict(meta)
        method = m.get("method")
        if method not in METHODS:
            raise CheckpointError(f"{checkpoint}: unknown unfamiliarity method {method!r} in dhumor.json's ood")
        tensors: dict[str, np.ndarray] = {}
        if m.get("file"):
            path = stats_path(checkpoint, m["file"])
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (dhumor.json's ood names it); copy it beside the weights "
                                      f"or remove the ood entry")
            from safetensors.numpy import load_file

            try:
                tensors = load_file(path)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read unfamiliarity statistics ({e})") from None
            bad = [k for k, v in tensors.items() if not np.isfinite(v.astype(np.float32)).all()]
            if bad:
                raise CheckpointError(f"{path}: non-finite values in {bad[:3]}")
        need = {"knn_streams": ("bank",), "knn_fused": ("bank",), "mahalanobis": ("means", "precision")}
        missing = [k for k in need.get(method, ()) if k not in tensors]
        if missing:
            raise CheckpointError(f"{checkpoint}: unfamiliarity statistics lack {missing}")
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if method == "mahalanobis":
            means, p = shapes["means"], shapes["precision"]
            if len(means) != 2 or means[0] < 1 or p != (means[1], means[1]):
                raise CheckpointError(f"{checkpoint}: unfamiliarity statistics have inconsistent shapes (means "
                                      f"{means}, precision {p})")
        elif method.startswith("knn") and len(shapes["bank"]) != 2:
            raise CheckpointError(f"{checkpoint}: unfamiliarity statistics: bank has shape {shapes['bank']}")
        info = {k: v for k, v in m.items() if k not in ("method", "threshold", "file", "bytes", "k")}
        th = m.get("threshold")
        return cls(method, tensors, k=int(m.get("k") or DEFAULT_K), threshold=None if th is None else float(th),
                   info=info)


def stats_path(checkpoint: str | Path, name: str = OOD_FILE) -> Path:
    """Where a checkpoint's statistics file lives: beside ``model.safetensors``, or in the run's
    ``export`` folder for a Lightning ``<run>/checkpoints/x.ckpt``."""
    p = Path(checkpoint)
    if p.is_dir():
        return p / name
    if p.suffix == ".ckpt":
        return p.resolve().parent.parent / "export" / name
    return p.parent / name


def uncertain_margin(p_positive: np.ndarray, threshold: float, coverage: float = UNCERTAIN_COVERAGE) -> float:
    """The distance from ``threshold`` inside which ``1 - coverage`` of the memes fall (the
    confidence-abstention preset: abstain on those nearest the threshold)."""
    d = np.abs(np.asarray(p_positive, np.float64) - threshold)
    return float(np.quantile(d, 1.0 - coverage)) if len(d) else 0.0


def fit_for_export(module, state: dict, train_loader, held_out_loader, split: str,
                   method: str = DEFAULT_METHOD, k: int = DEFAULT_K) -> tuple[OODScorer, Embeddings]:
    """Fit ``method`` on the training split's embeddings under ``state`` and set its threshold on the
    held-out selection split; returns the scorer and the held-out embeddings."""
    train = collect_embeddings(module, train_loader, state)
    held = collect_embeddings(module, held_out_loader, state)
    scorer = OODScorer.fit(method, train, k)
    scorer.info["fitted_on"] = f"train split without the held-out part (n={len(train)})"
    scorer.set_threshold(held, UNFAMILIAR_SHARE, split)
    return scorer, held
