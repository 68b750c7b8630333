"""bench/accuracy_search.py: retrieval features never see a meme's own label; ECE and temperature scaling."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
acc = pytest.importorskip("accuracy_search")


def _labels(harmful):
    lab = np.zeros((len(harmful), 8), np.float32)
    for i, h in enumerate(harmful):
        lab[i, 0] = h
        lab[i, 1 + (1 if h else 0)] = 1
        if h:
            lab[i, 4] = 1
    return lab


def test_leave_one_out_ignores_own_label():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8)).astype(np.float32)
    harmful = np.zeros(20)
    harmful[3] = 1  # the only harmful meme
    f = acc.retrieval_features(x, x, _labels(harmful), k=5, same=True)
    # Meme 3 sees only harmless neighbours: its own label must not leak into its feature.
    assert f[3, 0] == 0.0
    assert f[3, -2] < 0.999  # its top similarity is not itself (cosine 1)
    # Without leave-one-out the meme finds itself first.
    g = acc.retrieval_features(x, x, _labels(harmful), k=5, same=False)
    assert g[3, 0] > 0 and g[3, -2] == pytest.approx(1.0, abs=1e-5)


def test_duplicate_neighbour_dominates():
    rng = np.random.default_rng(1)
    index = rng.normal(size=(30, 16)).astype(np.float32)
    harmful = np.zeros(30)
    harmful[7] = 1
    f = acc.retrieval_features(index[7:8] + 1e-4, index, _labels(harmful), k=10, same=False)
    assert f[0, 0] > 0.5  # the near-duplicate (harmful) outweighs nine random harmless neighbours
    assert f[0, 4] == pytest.approx(1.0)  # target of the harmful neighbours only


def test_ece_and_temperature():
    rng = np.random.default_rng(0)
    n = 4000
    true_p = rng.choice([0.3, 0.7], n)
    y = (rng.random(n) < true_p).astype(int)  # calibrated: P(y=1 | p) = p
    # Overconfident predictions: the log-odds of calibrated ones, times 3.
    logit = 3 * np.log(true_p / (1 - true_p)) + rng.normal(0, 0.01, n)
    p1 = 1 / (1 + np.exp(-logit))
    probs = np.stack([1 - p1, p1], 1)
    before = acc.ece(probs, y)
    t = acc.fit_temperature(probs, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert acc.ece(acc.scale(probs, t), y) < before / 5
    perfect = np.stack([1 - true_p, true_p], 1)
    assert acc.ece(perfect, y) < 0.03


def test_second_view_trains_on_both_views_and_keeps_the_split_single(monkeypatch):
    """OCR-robust training: inner-train rows come in both views (gold and OCR caption features), while
    the selection split holds one view only, so no meme sits on both sides of it."""
    import tune_cv
    from dhumor.encoders.features import StreamFeature
    from dhumor.schema import Meme

    rng = np.random.default_rng(0)
    memes, gold, ocr = [], [], []
    for i in range(40):
        h = int(i % 2)
        memes.append(Meme(f"m{i}", None, f"c{i}", labels={"harmful": h, "harmfulness": h, "target": 0 if h else -1}))
        gold.append({s: StreamFeature(np.zeros((1, 8), np.float16), rng.normal(size=8).astype(np.float16))
                     for s in ("image", "caption")})
        ocr.append({"image": gold[-1]["image"],
                    "caption": StreamFeature(np.zeros((1, 8), np.float16), np.full(8, 7, np.float16))})
    seen = []
    real = tune_cv._loader
    monkeypatch.setattr(tune_cv, "_loader", lambda module, m, f, bs, shuffle: (seen.append((m, f, shuffle)),
                                                                                 real(module, m, f, bs, shuffle))[1])
    _, sel_memes, sel_feats = tune_cv.train_module({}, memes, gold, {"image": 8, "caption": 8}, 0, 1, 16,
                                                   second_view=ocr)
    train_call = next(c for c in seen if c[2])
    fit_memes, fit_feats = train_call[0], train_call[1]
    inner = {m.id for m in fit_memes}
    assert len(fit_memes) == 2 * len(inner) == 2 * (40 - len(sel_memes))
    assert not inner & {m.id for m in sel_memes}
    n_ocr = sum(float(f["caption"].pooled[0]) == 7.0 for f in fit_feats)
    assert n_ocr == len(inner)  # every inner-train meme once in its OCR view
    assert all(float(f["caption"].pooled[0]) != 7.0 for f in sel_feats)  # selection: gold view only


def test_partial_finetune_split_reproduces_the_encoders():
    """Lower part (cached once) then trainable top = the full pretrained encoder; only the top trains."""
    import torch

    pf = pytest.importorskip("partial_finetune")
    from dhumor.encoders.modules import build_encoder
    from dhumor.encoders.registry import get_entry

    full = build_encoder(get_entry("all-mpnet-base-v2")).eval()
    low, top = pf.LowerMPNet("all-mpnet-base-v2", 2).eval(), pf.MPNetTop("all-mpnet-base-v2", 2).eval()
    tok = full.tokenize(["a caption long enough to need padding on the other row", "short"])
    with torch.no_grad():
        want = full(tok["input_ids"], tok["attention_mask"]).pooled
        o = low(tok["input_ids"], tok["attention_mask"])
        n = int(o.mask[1].sum())  # the cache stores real tokens only: the short row alone, unpadded
        got = torch.cat([top(o.tokens[:1], o.mask[:1]), top(o.tokens[1:, :n], o.mask[1:, :n])])
    assert torch.allclose(want, got, atol=1e-5)
    assert len(top.encoder.layer) == 2

    img = build_encoder(get_entry("efficientnet-lite0")).eval()
    li, lt = pf.LowerLite("efficientnet-lite0", 1).eval(), pf.LiteTop("efficientnet-lite0", 1).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        o = li(x)
        assert torch.allclose(img(x).pooled, lt(o.tokens, o.mask), atol=1e-5)
    lt.train()
    lt(o.tokens, o.mask).sum().backward()
    assert all(p.grad is not None for p in lt.parameters() if p.requires_grad)
