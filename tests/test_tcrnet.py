"""TCRNet: fusion variants, missing streams, ablations, modality dropout."""
from __future__ import annotations

import pytest
import torch

from dhumor.model.tcrnet import StreamInput, TCRNet, TCRNetConfig
from dhumor.schema import DHUMOR, HARMEME

DIMS = {"image": 24, "caption": 16, "reasoning": 16}


def _inputs(b=5, tokens=False, present=None):
    out = {}
    for s, d in DIMS.items():
        x = StreamInput(pooled=torch.randn(b, d), present=None if present is None else present[s])
        if tokens:
            n = 7
            x.tokens, x.mask = torch.randn(b, n, d), torch.arange(n)[None].expand(b, n) < torch.randint(1, n + 1, (b, 1))
        out[s] = x
    return out


@pytest.mark.parametrize("fusion", ["pairwise", "joint"])
@pytest.mark.parametrize("inputs", ["pooled", "tokens"])
def test_shapes_and_gradients(fusion, inputs):
    net = TCRNet(DHUMOR, DIMS, TCRNetConfig(d_model=16, heads=2, fusion=fusion, inputs=inputs))
    out = net(_inputs(tokens=inputs == "tokens"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"humor": (5, 2), "target": (5, 6), "intensity": (5, 3)}
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if "missing" not in n)
    expected_pairs = 6 if fusion == "pairwise" else 3
    assert len(net.pairs) == expected_pairs


def test_absent_stream_uses_the_missing_embedding():
    torch.manual_seed(0)
    net = TCRNet(HARMEME, DIMS, TCRNetConfig(d_model=16, heads=2)).eval()
    present = {"image": torch.tensor([True, True]), "caption": torch.tensor([True, True]),
               "reasoning": torch.tensor([False, False])}
    x = _inputs(2, present=present)
    a = net(x)["harmful"]
    x["reasoning"].pooled = torch.randn(2, 16) * 100  # whatever sits in an absent stream is ignored
    assert torch.allclose(a, net(x)["harmful"])
    assert torch.isfinite(a).all()


def test_every_stream_absent_for_one_meme_still_finite():
    net = TCRNet(HARMEME, DIMS, TCRNetConfig(d_model=16, heads=2, inputs="tokens")).eval()
    none = torch.tensor([False, True])
    x = _inputs(2, tokens=True, present={s: none for s in DIMS})
    assert all(torch.isfinite(v).all() for v in net(x).values())


def test_single_stream_ablation():
    net = TCRNet(HARMEME, {"caption": 16}, TCRNetConfig(d_model=16, heads=2))
    assert net.pairs == []
    out = net({"caption": StreamInput(pooled=torch.randn(3, 16))})
    assert out["harmfulness"].shape == (3, 3)


def test_missing_stream_key_is_a_clear_error():
    net = TCRNet(HARMEME, DIMS, TCRNetConfig(d_model=16, heads=2))
    x = _inputs()
    del x["image"]
    with pytest.raises(KeyError, match="missing \\['image'\\]"):
        net(x)


def test_modality_dropout_never_drops_every_stream():
    net = TCRNet(HARMEME, DIMS, TCRNetConfig(d_model=16, heads=2, modality_dropout=0.9)).train()
    torch.manual_seed(0)
    present = net._present(_inputs(2000))
    stacked = torch.stack(list(present.values()), 1)
    assert stacked.any(1).all()
    assert 0.6 < (~stacked).float().mean() < 0.7  # ~2/3 dropped: all but one stream where all would go
    net.eval()
    assert torch.stack(list(net._present(_inputs(10)).values()), 1).all()
