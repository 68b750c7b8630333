"""The paper's fine-tuning recipe, then dhumor's, one change at a time, in one process on one device.

Reference (the D-HUMOR code, as timed by shared/bench/reference_recipe.py): BERT-base + ViT-B/16 +
MPNet-base fine-tuned end to end in fp32, batch 16, max_len 128, AdamW lr 2e-5; CLS vectors,
projection, each stream attends jointly over the other two, concat, MLP.

The ladder then runs dhumor's own DHumorModule in fine-tune mode with the same encoder sizes, through
its own ``training_step`` and ``configure_optimizers`` (what ``dhumor fit`` runs), adding one change
per rung, so that each rung's speed-up over the rung before it is that change's alone:

  1. dhumor, paper's recipe: fp32, batch 16, unfused AdamW (the module vs the paper's code)
  2. + bf16 autocast (what ``trainer.precision: bf16-mixed`` does)
  3. + batch 128 (lr scaled by the square root of the batch ratio)
  4. + fused AdamW (``configure_optimizers`` picks it on CUDA)
  5. + torch.compile of what ``fit`` compiles (``model.compile: true``: the fusion network, not the encoders)
  6. + dynamic padding: captions padded to the longest in the batch (rounded up to 32), with Harm-C's
     caption-length distribution, instead of always 128 tokens

TF32 stays off on every rung (the paper's code does not enable it). Scoring is timed for the reference
and for the last rung (eval mode, batch 512). Encoders are randomly initialised from their configs (same
shapes and FLOPs as pretrained ones).

    python bench/gpu_recipe.py                 # on a GPU: full-size models
    python bench/gpu_recipe.py --tiny --out /tmp/tiny.json   # on a CPU: tiny configs, same code (what CI runs)

Output: one JSON line per measurement, then a summary JSON line with the ladder's ratios.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from record import Recorder, refuse_subset_over_default, results_path

# Harm-C train caption lengths in BERT uncased WordPiece tokens (incl. [CLS]/[SEP]), percentiles
# 10/25/50/75/90/95/99 measured on this repository's machine: sampled by the dynamic variant.
CAPTION_LEN_PERCENTILES = [10, 15, 22, 33, 49, 61, 93]
SCHEMA = {"name": "bench", "primary": "humor", "tasks": [{"name": "humor", "classes": ["no", "yes"]}]}


# ------------------------------------------------------------------ the reference recipe
class RefTCRNet(nn.Module):
    """The reference model, as in shared/bench/reference_recipe.py (configs injectable for --tiny)."""

    def __init__(self, bert_cfg, vit_cfg, mpnet_cfg, n_labels=2, heads=8, p=0.3):
        super().__init__()
        from transformers import BertModel, MPNetModel, ViTModel

        self.bert, self.vit, self.mpnet = BertModel(bert_cfg), ViTModel(vit_cfg), MPNetModel(mpnet_cfg)
        d = bert_cfg.hidden_size
        proj = lambda: nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.Dropout(p))  # noqa: E731
        self.tp, self.vp, self.rp = proj(), proj(), proj()
        self.at, self.av, self.ar = (nn.MultiheadAttention(d, heads, batch_first=True) for _ in range(3))
        self.fc = nn.Sequential(nn.Linear(3 * d, 512), nn.ReLU(), nn.Dropout(p), nn.Linear(512, n_labels))

    def fuse(self, t, v, r):
        a, _ = self.at(t[:, None], torch.stack([v, r], 1), torch.stack([v, r], 1))
        b, _ = self.av(v[:, None], torch.stack([t, r], 1), torch.stack([t, r], 1))
        c, _ = self.ar(r[:, None], torch.stack([v, t], 1), torch.stack([v, t], 1))
        return self.fc(torch.cat([a[:, 0], b[:, 0], c[:, 0]], 1))

    def forward(self, img, tid, tmask, rid, rmask):
        t = self.tp(self.bert(input_ids=tid, attention_mask=tmask).last_hidden_state[:, 0])
        v = self.vp(self.vit(pixel_values=img).last_hidden_state[:, 0])
        r = self.rp(self.mpnet(input_ids=rid, attention_mask=rmask).last_hidden_state[:, 0])
        return self.fuse(t, v, r)


# ------------------------------------------------------------------ model configs
def configs(tiny: bool):
    from transformers import BertConfig, MPNetConfig, ViTConfig

    if not tiny:
        return BertConfig(), ViTConfig(), MPNetConfig(vocab_size=30527)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return BertConfig(**small), ViTConfig(**small, image_size=32, patch_size=8), MPNetConfig(**small, vocab_size=30527)


def dhumor_module(tiny: bool, workdir: Path, lr: float, compile: bool = False):
    """DHumorModule in fine-tune mode with the same encoder sizes (random init)."""
    from dhumor.model.lit import DHumorModule

    if tiny:
        bert, vit, mpnet = configs(True)
        for name, cfg in (("bert", bert), ("vit", vit), ("mpnet", mpnet)):
            cfg.save_pretrained(workdir / name)
        enc = dict(image_encoder=f"vit:{workdir / 'vit'}", caption_encoder=f"hf:{workdir / 'bert'}",
                   reasoning_encoder=f"hf:{workdir / 'mpnet'}")
        d, heads = 32, 2
    else:
        enc = dict(image_encoder="vit-base-patch16-224", caption_encoder="bert-base-uncased",
                   reasoning_encoder="all-mpnet-base-v2")
        d, heads = 768, 8
    return DHumorModule(task=SCHEMA, mode="finetune", pretrained=False, fusion="joint", d_model=d, heads=heads,
                        tokens_per_stream=1, hidden=512, dropout=0.3, modality_dropout=0.0, input_dropout=0.0,
                        class_weights="none", lr=lr, encoder_lr=lr, warmup_ratio=0.0, weight_decay=1e-4,
                        compile=compile, **enc)


# ------------------------------------------------------------------ inputs
def caption_lengths(n: int, rng: np.random.Generator, max_len: int) -> np.ndarray:
    """Samples from the Harm-C caption-length distribution (piecewise-linear between percentiles)."""
    q = np.interp(rng.random(n), [0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99], CAPTION_LEN_PERCENTILES)
    return np.clip(np.round(q), 4, max_len).astype(int)


def make_batch(bs: int, dev, image_size: int, seq: int, dynamic: bool, rng, vocab: int = 30000):
    img = torch.randn(bs, 3, image_size, image_size, device=dev)
    if dynamic:
        lens = caption_lengths(bs, rng, seq)
        t_len = min(seq, int(math.ceil(lens.max() / 32) * 32))  # few distinct shapes: few recompiles
        tmask = (torch.arange(t_len)[None] < torch.from_numpy(lens)[:, None]).long().to(dev)
    else:
        t_len = seq
        tmask = torch.ones(bs, seq, dtype=torch.long, device=dev)
    tid = torch.randint(1000, vocab, (bs, t_len), device=dev) * tmask
    rid = torch.randint(1000, vocab, (bs, seq), device=dev)  # explanations fill the 128 tokens
    rmask = torch.ones(bs, seq, dtype=torch.long, device=dev)
    y = torch.randint(0, 2, (bs,), device=dev)
    return img, tid, tmask, rid, rmask, y


def as_dhumor_batch(b):
    img, tid, tmask, rid, rmask, y = b
    on = torch.ones(len(y), dtype=torch.bool, device=y.device)
    return {"ids": list(range(len(y))), "labels": {"humor": y},
            "inputs": {"image": {"pixel_values": img, "present": on},
                       "caption": {"input_ids": tid, "attention_mask": tmask, "present": on},
                       "reasoning": {"input_ids": rid, "attention_mask": rmask, "present": on}}}


# ------------------------------------------------------------------ timing
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, batches, n, warm, dev) -> float:
    """Seconds per step over ``n`` steps after ``warm`` warm-up steps (batches cycled)."""
    for i in range(warm):
        fn(batches[i % len(batches)])
    sync(dev)
    t = time.perf_counter()
    for i in range(n):
        fn(batches[i % len(batches)])
    sync(dev)
    return (time.perf_counter() - t) / n


def flops_per_sample(fn, batch, bs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn(batch)
    return fc.get_total_flops() / bs


def measure(name, fn, batches, bs, n, warm, dev, flop_batch=None) -> dict:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sec = timeit(fn, batches, n, warm, dev)
    fps = flops_per_sample(fn, flop_batch or batches[0], bs)
    row = {"case": name, "batch": bs, "ms_per_step": round(sec * 1e3, 2), "samples_per_s": round(bs / sec, 1),
           "gflop_per_sample": round(fps / 1e9, 2), "tflops": round(fps * bs / sec / 1e12, 3)}
    if dev.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(row), flush=True)
    return row


# Operator-name fragments -> where the time goes (first match wins).
PROFILE_GROUPS = [("attention (SDPA / flash)", ("attention", "flash", "efficient", "sdpa")),
                  ("matmul (GEMM)", ("mm", "matmul", "linear", "gemm", "cutlass", "sm90", "ampere")),
                  ("optimizer", ("adam", "foreach", "_fused")),
                  ("normalisation", ("norm",)),
                  ("convolution (patch embed)", ("conv",)),
                  ("copies / casts", ("copy", "to_copy", "cast", "contiguous", "cat", "memcpy")),
                  ("elementwise / activations", ("gelu", "add", "mul", "div", "dropout", "softmax", "tanh",
                                                 "elementwise", "triton", "vectorized", "where", "exp"))]


def profile_steps(fn, batches, dev, n: int = 3, top: int = 12) -> dict:
    """Self time per operator over ``n`` steps (device time on a GPU), grouped as PROFILE_GROUPS."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    fn(batches[0])
    sync(dev)
    with profile(activities=acts) as prof:
        for i in range(n):
            fn(batches[i % len(batches)])
        sync(dev)
    attr = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = [(e.key, getattr(e, attr, 0) or 0) for e in prof.key_averages()]
    events = [(k, t) for k, t in events if t > 0 and not k.startswith(("ProfilerStep", "cudaDeviceSynchronize"))]
    total = sum(t for _, t in events) or 1
    groups: dict[str, float] = {}
    for key, t in events:
        low = key.lower()
        g = next((name for name, frags in PROFILE_GROUPS if any(f in low for f in frags)), "other")
        groups[g] = groups.get(g, 0.0) + t
    return {"clock": "device" if dev.type == "cuda" else "cpu", "ms_per_step": round(total / n / 1e3, 2),
            "share": {g: round(t / total, 3) for g, t in sorted(groups.items(), key=lambda x: -x[1])},
            "top_ops": [{"op": k[:80], "share": round(t / total, 3)}
                        for k, t in sorted(events, key=lambda x: -x[1])[:top]]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke run; what CI runs)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip compilation on the compile rungs")
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--infer-batch", type=int, default=None)
    ap.add_argument("--out", default=str(results_path("gpu_recipe")))
    ap.add_argument("--profile", action="store_true",
                    help="also profile dhumor's training step (len128): where the time goes, by operator group")
    args = ap.parse_args(argv)
    rec = Recorder("gpu_recipe")
    refuse_subset_over_default(ap, args.out, results_path("gpu_recipe"), ["--tiny"] if args.tiny else [])
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    gpu = dev.type == "cuda"
    steps = args.steps or (20 if gpu else 2)
    warm = args.warmup if args.warmup is not None else (5 if gpu else 1)
    ref_bs, tr_bs = 16, args.train_batch or (128 if gpu else 32)
    inf_bs = args.infer_batch or (512 if gpu else 16)
    compile_ = not args.no_compile
    seq = 128 if gpu else 16
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    rows = []

    # -------- reference recipe: fp32, batch 16, no TF32 (as the paper's code runs)
    bert_cfg, vit_cfg, mpnet_cfg = configs(args.tiny or not gpu)
    image_size = vit_cfg.image_size
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = RefTCRNet(bert_cfg, vit_cfg, mpnet_cfg, heads=8 if gpu else 2).to(dev)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=2e-5, weight_decay=1e-4)
    ce = nn.CrossEntropyLoss()

    def ref_train(b):
        img, tid, tm, rid, rm, y = b
        ref_opt.zero_grad(set_to_none=True)
        ce(ref(img, tid, tm, rid, rm), y).backward()
        ref_opt.step()

    ref_batches = [make_batch(ref_bs, dev, image_size, seq, False, rng) for _ in range(2)]
    ref.train()
    rows.append(measure("reference_train_fp32", ref_train, ref_batches, ref_bs, steps, warm, dev))
    ref.eval()
    with torch.no_grad():
        rows.append(measure("reference_score_fp32", lambda b: ref(*b[:5]), ref_batches, ref_bs, steps, warm, dev))
    del ref, ref_opt
    if gpu:
        torch.cuda.empty_cache()

    # -------- the ladder: dhumor's module, its own training_step and configure_optimizers
    ladder = [("dhumor_paper_recipe", dict(bf16=False, big=False, fused=False, compile=False, dynamic=False)),
              ("+bf16", dict(bf16=True, big=False, fused=False, compile=False, dynamic=False)),
              ("+batch", dict(bf16=True, big=True, fused=False, compile=False, dynamic=False)),
              ("+fused_adamw", dict(bf16=True, big=True, fused=True, compile=False, dynamic=False)),
              ("+compile", dict(bf16=True, big=True, fused=True, compile=compile_, dynamic=False)),
              ("+dynamic_padding", dict(bf16=True, big=True, fused=True, compile=compile_, dynamic=True))]
    amp_dtype = torch.bfloat16
    steps_rows, module, profile_row = [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        prev_rung = None
        for name, rung in ladder:
            bs = tr_bs if rung["big"] else ref_bs
            lr = 2e-5 * math.sqrt(bs / ref_bs)  # square-root scaling of the paper's lr for a larger batch
            if prev_rung is None or {**prev_rung, "dynamic": None} != {**rung, "dynamic": None}:
                # A new module per rung, except when only the data changes (no second compilation).
                module = opt = sched = None
                if gpu:
                    torch.cuda.empty_cache()
                torch.manual_seed(0)
                module = dhumor_module(args.tiny or not gpu, Path(tmp), lr, compile=rung["compile"]).to(dev)
                module.setup("fit")  # what fit does before training: compiles module.net when compile is on
                opt, sched = optimizer_of(module, fused=rung["fused"])
            prev_rung = rung
            amp = torch.autocast(dev.type, dtype=amp_dtype, enabled=rung["bf16"])

            def train_step(b, module=module, opt=opt, sched=sched, amp=amp):
                opt.zero_grad(set_to_none=True)
                with amp:
                    loss = module.training_step(b, 0)
                loss.backward()
                opt.step()
                sched.step()

            batches = [as_dhumor_batch(make_batch(bs, dev, image_size, seq, rung["dynamic"], rng)) for _ in range(8)]
            module.train()
            row = measure(f"ladder_train:{name}", train_step, batches, bs, steps, warm + 3 * rung["compile"], dev)
            row.update(rung)
            steps_rows.append(row)
            if args.profile and name == "+compile":
                prof = profile_steps(train_step, batches, dev)
                print(json.dumps({"profile": "dhumor_train_len128", **prof}), flush=True)
                profile_row = {"case": "profile_dhumor_train_len128", **prof}
            del batches
        module.eval()
        amp = torch.autocast(dev.type, dtype=amp_dtype, enabled=True)

        def score(b):
            with amp:
                return module(b)

        ib = [as_dhumor_batch(make_batch(inf_bs, dev, image_size, seq, True, rng)) for _ in range(4)]
        with torch.no_grad():
            score_row = measure("dhumor_score_final", score, ib, inf_bs, steps, warm + 3 * compile_, dev)
    rows += steps_rows + [score_row] + ([profile_row] if profile_row else [])

    ref_tr, ref_sc = rows[0]["samples_per_s"], rows[1]["samples_per_s"]
    prev, rungs = ref_tr, []
    for (name, _), row in zip(ladder, steps_rows):
        rungs.append({"rung": name, "samples_per_s": row["samples_per_s"],
                      "speedup_vs_previous": round(row["samples_per_s"] / prev, 2),
                      "speedup_vs_reference": round(row["samples_per_s"] / ref_tr, 2)})
        prev = row["samples_per_s"]
    summary = {
        "device": torch.cuda.get_device_name() if gpu else "cpu (tiny configs: code path check, not a speed claim)",
        "torch": torch.__version__, "compile": compile_, "ladder": rungs,
        "train_ratio_final": rungs[-1]["speedup_vs_reference"],
        "score_ratio_final": round(score_row["samples_per_s"] / ref_sc, 2),
        "targets": {"train": 10, "score": 12},
    }
    print(json.dumps(summary), flush=True)
    rec.write({"rows": rows, "summary": summary}, args.out)
    return summary


def optimizer_of(module, fused: bool):
    """The module's own ``configure_optimizers``, with AdamW's fused kernel set as the rung asks: it picks
    fused on CUDA by itself, and the rung before this one must measure without it."""
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    for g in opt.param_groups:
        g["fused"] = fused
        g["foreach"] = None if fused else g.get("foreach")
    opt.defaults["fused"] = fused
    return opt, sched


if __name__ == "__main__":
    main()
