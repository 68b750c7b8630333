"""LightningDataModule: manifests in, batches of cached features (or images + texts) out.

Splits: ``train``, ``val``, ``test`` and ``predict`` are manifests (or image folders). Without a
``val`` manifest, a stratified ``val_fraction`` of train (seeded by ``split_seed``) is held out
for early stopping and checkpoint selection, so that the data numbers are reported on
(``test``) never steer training. For HarMeme Harm-C, whose official test split is withheld,
the configs use Harm-C *val* as ``test``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from dhumor.errors import InvalidValueError
from typing import Literal, Sequence

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from dhumor.cache import StageCache
from dhumor.errors import ConfigError, DataError
from dhumor.encoders.features import FeatureExtractor, StreamFeature
from dhumor.images import load_image
from dhumor.schema import MISSING, STREAMS, Meme, TaskSchema, get_schema
from dhumor.data.datasets import FeatureDataset, ImageTextDataset, feature_collate, finetune_collate
from dhumor.paths import data_root, get_data_hint, resolve_data_path
from dhumor.data.explanations import attach_explanations, explanations_source
from dhumor.data.readers import ReadResult, read_manifest
from dhumor.encoders.transforms import eval_transform, resize_uint8, train_transform

log = logging.getLogger("dhumor")


def split_train_val(memes: Sequence[Meme], fraction: float, seed: int, stratify_task: str) -> tuple[list[Meme], list[Meme]]:
    """A seeded split of train into train/val, stratified by ``stratify_task`` where every class allows it."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(memes))
    y = np.array([m.labels.get(stratify_task, MISSING) for m in memes])
    counts = np.bincount(y[y >= 0]) if (y >= 0).any() else np.array([])
    strat = y if len(counts) and (counts[counts > 0] >= 2).all() and (y >= 0).all() else None
    tr, va = train_test_split(idx, test_size=fraction, random_state=seed, stratify=strat)
    return [memes[i] for i in sorted(tr)], [memes[i] for i in sorted(va)]


def mix_extra(train: list[Meme], val: list[Meme] | None, extra: list[Meme], ratio: float | None, val_fraction: float,
              seed: int, stratify_task: str) -> tuple[list[Meme], list[Meme] | None]:
    """Train (and val) with ``extra`` memes mixed in.

    An extra meme replaces an original one with the same image file (the newer label wins). When
    ``val`` is a split of train, ``val_fraction`` of the extra memes joins it, so that selection also
    sees the new memes' distribution. ``ratio`` = original training memes kept per extra meme."""
    new_images = {str(Path(m.image).resolve()) for m in extra if m.image is not None}
    fresh = lambda ms: [m for m in ms if m.image is None or str(Path(m.image).resolve()) not in new_images]  # noqa: E731
    train = fresh(train)
    if ratio is not None:
        n = min(len(train), int(round(ratio * len(extra))))
        keep = np.random.default_rng(seed).choice(len(train), size=n, replace=False)
        train = [train[i] for i in sorted(keep)]
    if val is None:
        return train + list(extra), None
    val = fresh(val)
    if len(extra) >= 10 and val_fraction > 0:
        ex_tr, ex_va = split_train_val(extra, val_fraction, seed, stratify_task)
    else:  # too few to split: all of them train
        ex_tr, ex_va = list(extra), []
    return train + ex_tr, val + ex_va


def check_data_exists(path: str, root: str | None = None) -> Path:
    """The resolved data path; a one-line :class:`ConfigError` naming the fix when it is not there."""
    resolved = resolve_data_path(path, root)
    if not resolved.exists():
        raise ConfigError(f"{resolved}: data not found (data root {data_root(root)}); {get_data_hint(root)}")
    return resolved


def check_subcommand_data(subcommand: str | None, data: dict) -> None:
    """Check the configured paths a Lightning subcommand will read (``data``: the config's data section)."""
    keys = {"fit": ("train", "val", "extra"), "test": ("test",), "predict": ("predict",),
            "validate": ("val",) if data.get("val") else ("train",)}.get(subcommand, ())  # no val: a split of train
    for key in keys:
        if data.get(key):
            check_data_exists(data[key], data.get("root"))
    if subcommand == "predict" and data.get("predict") and "caption" in (data.get("streams") or STREAMS):
        _refuse_uncaptioned(resolve_data_path(data["predict"], data.get("root")), data.get("format") or "auto")


def _refuse_uncaptioned(path: Path, fmt: str) -> None:
    """``dhumor predict`` reads captions as given and runs no OCR: a folder of images, or manifest rows
    without a caption, would be predicted with the caption stream absent. Refused in one line that
    names the command that reads captions (``dhumor score`` runs OCR through the one pipeline)."""
    if path.is_dir() or fmt == "folder":
        raise ConfigError(f"dhumor predict: {path} is a folder of images without captions, and this model reads "
                          f"captions; score it with `dhumor score {path} --out results.jsonl` (it reads them by OCR)")
    res = read_manifest(path, fmt, None, skip_bad=True)
    bare = [m.id for m in res.memes if m.caption is None]
    if bare:
        raise ConfigError(f"dhumor predict: {len(bare)} of {len(res.memes)} memes in {path} have no caption "
                          f"(e.g. {bare[0]!r}), and this model reads captions; score them with "
                          f"`dhumor score {path} --out results.jsonl` (it reads missing captions by OCR)")


class MemeDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        root: str | None = None,
        format: Literal["auto", "harmeme", "dhumor", "folder"] = "auto",
        images: str | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        skip_bad: bool = False,
        cache: str | None = None,
        reasoning: Literal["column", "none"] = "column",
        explanations: str | None = None,
        explanation_iteration: int = -1,
        feature_batch_size: int = 32,
        feature_device: str = "auto",
        progress: bool = True,
        # Linked from the model section by the CLI (one source of truth):
        task: str = "harmeme",
        streams: list[str] = list(STREAMS),
        image_encoder: str = "efficientnet-lite0",
        caption_encoder: str = "all-mpnet-base-v2",
        reasoning_encoder: str = "all-mpnet-base-v2",
        mode: Literal["cached", "finetune"] = "cached",
        inputs: Literal["pooled", "tokens"] = "pooled",
        max_tokens: int = 128,
        extra: str | None = None,
        extra_ratio: float | None = None,
    ):
        """
        Args:
            train: training manifest (HarMeme jsonl, D-HUMOR csv/xlsx); a relative path resolves under
                ``root`` (e.g. ``train: train.jsonl``).
            val: validation manifest for selection (default: a held-out ``val_fraction`` of train).
            test: manifest the numbers are reported on (``dhumor test``; Harm-C val for HarMeme).
            predict: manifest or image folder to predict (``dhumor predict``).
            root: data root that relative paths resolve against (default ``$DHUMOR_DATA``, else
                ``data/harmeme-c``); a relative path not found there is read from the current directory.
            format: manifest format; ``auto`` decides by file extension.
            images: folder the manifests' images live in (default: ``images/`` beside the manifest).
            val_fraction: held-out fraction of train used as val (selection, calibration, thresholds) when
                ``val`` is not given.
            split_seed: seed of that held-out split (stratified by the primary task).
            batch_size: memes per training / evaluation batch.
            num_workers: DataLoader worker processes (0 = load in the main process).
            skip_bad: skip bad rows and unusable images (counted and logged) instead of failing.
            cache: stage-cache SQLite file (default ``$DHUMOR_CACHE`` or ``~/.cache/dhumor/cache.sqlite``).
            reasoning: where the reasoning stream's text comes from without ``explanations``:
                the dataset's explanation column, or nowhere (the stream is absent).
            explanations: a JSONL written by ``dhumor explain``; its explanations feed the reasoning stream.
            explanation_iteration: which Role-Reversal iteration to use (1-based; -1 = the last).
            feature_batch_size: memes per encoder batch when filling the feature cache (cached mode).
            feature_device: device of the frozen encoders that compute features (``auto``, ``cpu``, ``cuda``).
            progress: show progress bars while features are computed.

            extra: a second labelled manifest mixed into train, e.g. reviewed memes from
                ``dhumor reviews export`` (retraining: set ``model.init_from`` too).
            extra_ratio: original training memes per extra meme (a seeded sample; None = all of them).

        ``task``, ``streams``, the encoder names, ``mode``, ``inputs`` and ``max_tokens`` are linked from
        the model section: set them under ``model:``.
        """
        super().__init__()
        self.save_hyperparameters()
        self.schema: TaskSchema = get_schema(task)
        self.streams = [s for s in STREAMS if s in streams]
        self._splits: dict[str, tuple[list[Meme], list]] = {}
        self.datasets: dict = {}
        self.skipped: list[DataError] = []
        self._extractor: FeatureExtractor | None = None

    # ------------------------------------------------------------ reading
    @property
    def encoder_names(self) -> dict[str, str]:
        hp = self.hparams
        names = {"image": hp.image_encoder, "caption": hp.caption_encoder, "reasoning": hp.reasoning_encoder}
        return {s: names[s] for s in self.streams}

    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            hp = self.hparams
            self._extractor = FeatureExtractor(
                self.encoder_names, StageCache(hp.cache),
                device=hp.feature_device, batch_size=hp.feature_batch_size, progress=hp.progress,
                max_tokens={s: hp.max_tokens for s in ("caption", "reasoning")})
        return self._extractor

    def resolve(self, path: str) -> Path:
        """A configured data path, resolved against the data root (see ``root``)."""
        return resolve_data_path(path, self.hparams.root)

    def _read(self, path: str) -> list[Meme]:
        hp = self.hparams
        resolved = check_data_exists(path, hp.root)
        images = self.resolve(hp.images) if hp.images else None
        res: ReadResult = read_manifest(resolved, hp.format, images, hp.skip_bad)
        if res.schema_name is not None and res.schema_name != self.schema.name:
            raise DataError(path, f"this manifest carries {res.schema_name!r} labels but the model's task schema "
                                  f"is {self.schema.name!r}; set model.task: {res.schema_name}")
        self._record_skips(res.skipped)
        memes = res.memes
        if hp.reasoning == "none":
            for m in memes:
                m.explanation = None
        if hp.explanations:
            attach_explanations(memes, self.resolve(hp.explanations), iteration=hp.explanation_iteration)
        return memes

    def reasoning_source(self) -> dict:
        """Where the reasoning stream's text came from, for the checkpoint: ``{"kind": "explanations", file,
        backend, model, prompt_version, iteration}``, ``{"kind": "column"}`` or ``{"kind": "none"}``."""
        hp = self.hparams
        if "reasoning" not in self.streams:
            return {"kind": "none"}
        if hp.explanations:
            return explanations_source(self.resolve(hp.explanations), hp.explanation_iteration)
        return {"kind": "column"} if hp.reasoning == "column" else {"kind": "none"}

    def _record_skips(self, errors: Sequence[DataError]) -> None:
        for e in errors:
            log.warning("skipped %s", e)
        self.skipped.extend(errors)

    def _memes(self, split: str) -> list[Meme]:
        hp = self.hparams
        if split in ("train", "val") and not hp.val and hp.train:
            if "train" not in self._splits:
                tr, va = split_train_val(self._read(hp.train), hp.val_fraction, hp.split_seed, self.schema.primary)
                if hp.extra:
                    tr, va = self._with_extra(tr, va)
                self._splits["train"], self._splits["val"] = (tr, None), (va, None)
            return self._splits[split][0]
        path = getattr(hp, split)
        if not path:
            raise InvalidValueError(f"no {split} data: set data.{split} in the config or on the command line")
        if split not in self._splits:
            memes = self._read(path)
            if split == "train" and hp.extra:
                memes, _ = self._with_extra(memes, None)
            self._splits[split] = (memes, None)
        return self._splits[split][0]

    def _with_extra(self, train: list[Meme], val: list[Meme] | None) -> tuple[list[Meme], list[Meme] | None]:
        """Mix ``extra`` into train (and, when val is a split of train, its share into val)."""
        hp = self.hparams
        extra = self._read(hp.extra)
        return mix_extra(train, val, extra, hp.extra_ratio, hp.val_fraction, hp.split_seed, self.schema.primary)

    def _features(self, split: str) -> tuple[list[Meme], list[dict[str, StreamFeature | None]]]:
        memes = self._memes(split)
        cached = self._splits[split][1]
        if cached is not None:
            return cached
        feats, errors = self.extractor().extract(memes, self.streams)
        if errors and not self.hparams.skip_bad:
            first = next(iter(errors.values()))
            raise DataError(first.file, f"{first.reason} ({len(errors)} unusable image(s) in {split}; "
                                        f"pass --data.skip_bad true to skip them)")
        self._record_skips(list(errors.values()))
        keep = [i for i in range(len(memes)) if i not in errors]
        result = ([memes[i] for i in keep], [feats[i] for i in keep])
        self._splits[split] = (memes, result)
        return result

    def _images(self, memes: list[Meme]) -> tuple[list[Meme], list[np.ndarray]]:
        from dhumor.encoders.registry import get_entry

        entry = get_entry(self.hparams.image_encoder)
        kept, arrays = [], []
        for m in memes:
            try:
                arrays.append(resize_uint8(load_image(m.image), entry))
                kept.append(m)
            except DataError as e:
                if not self.hparams.skip_bad:
                    raise
                self._record_skips([e])
        return kept, arrays

    # ------------------------------------------------------------ Lightning hooks
    def _active_splits(self, stage: str | None) -> list[str]:
        hp = self.hparams
        by_stage = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        splits = by_stage.get(stage, ["train", "val", "test", "predict"])
        return [s for s in splits if getattr(hp, s) or (s == "val" and hp.train)]

    def prepare_data(self) -> None:
        # Runs on one process per node: fills the feature cache so that every rank's setup only reads it.
        if self.hparams.mode == "cached":
            fn = self.trainer.state.fn if self.trainer is not None else None
            for split in self._active_splits(fn.value if fn is not None else None):
                self._features(split)

    def setup(self, stage: str | None = None) -> None:
        for split in self._active_splits(stage):
            if split in self.datasets:
                continue
            if self.hparams.mode == "cached":
                memes, feats = self._features(split)
                self.datasets[split] = FeatureDataset(memes, feats)
            else:
                from dhumor.encoders.registry import get_entry

                memes, arrays = self._images(self._memes(split))
                entry = get_entry(self.hparams.image_encoder)
                tf = train_transform(entry) if split == "train" else eval_transform(entry)
                self.datasets[split] = ImageTextDataset(memes, arrays, tf)

    def class_counts(self) -> dict[str, list[int]]:
        """Per task, how many training memes carry each class (for class-balanced loss weights)."""
        memes = self.datasets["train"].memes if "train" in self.datasets else self._memes("train")
        out = {}
        for t in self.schema.tasks:
            y = np.array([m.labels.get(t.name, MISSING) for m in memes])
            out[t.name] = np.bincount(y[y >= 0], minlength=t.num_classes).tolist()
        return out

    def _collate(self):
        if self.hparams.mode == "cached":
            return feature_collate(self.schema, self.extractor().dims(self.streams), self.hparams.inputs == "tokens")
        from transformers import AutoTokenizer

        from dhumor.encoders.modules import text_source  # each text encoder's own tokenizer files
        from dhumor.encoders.registry import get_entry

        toks = {}
        for s in ("caption", "reasoning"):
            if s in self.streams:
                entry = get_entry(self.encoder_names[s])
                toks[s] = AutoTokenizer.from_pretrained(text_source(entry))
        mt = {s: self.hparams.max_tokens for s in ("caption", "reasoning")}
        return finetune_collate(self.schema, toks, self.streams, mt)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(self.datasets[split], batch_size=hp.batch_size, shuffle=shuffle, num_workers=hp.num_workers,
                          collate_fn=self._collate(), pin_memory=hp.mode == "finetune",
                          persistent_workers=hp.num_workers > 0, drop_last=False)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def predict_dataloader(self):
        return self._loader("predict", shuffle=False)
