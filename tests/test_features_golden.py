"""The features' numbers are pinned: a change to preprocessing, an encoder's forward or pooling that
alters them must bump :data:`dhumor.encoders.features.FEATURE_VERSION` (so that cached features are recomputed)
and regenerate the golden file: ``python tests/test_features_golden.py``. A refactor that keeps the
numbers needs neither (the cache key no longer hashes source code)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).parent / "golden" / "features.json"
EXAMPLE = Path(__file__).resolve().parent.parent / "dhumor" / "assets" / "examples" / "chelsea.jpg"
TEXT = "when the vet says it's just a small procedure"
STREAMS = {"image": "efficientnet-lite0", "caption": "all-minilm-l6-v2", "reasoning": "all-mpnet-base-v2"}


def compute() -> dict:
    from dhumor.cache import StageCache
    from dhumor.encoders.features import FEATURE_VERSION, FeatureExtractor
    from dhumor.images import load_image_with_digest

    fx = FeatureExtractor(STREAMS, StageCache(":memory:"), device="cpu", progress=False)
    img, sha = load_image_with_digest(EXAMPLE)
    out = {"version": FEATURE_VERSION}
    feats = {"image": fx.image_features_from_pil([img], [sha])[0],
             "caption": fx.text_features("caption", [TEXT])[0], "reasoning": fx.text_features("reasoning", [TEXT])[0]}
    for s, f in feats.items():
        p = f.pooled.astype(np.float64)
        out[s] = {"dim": int(p.shape[0]), "tokens": int(f.tokens.shape[0]), "norm": round(float(np.linalg.norm(p)), 4),
                  "head": [round(float(v), 4) for v in p[:8]]}
    return out


def test_features_match_the_golden_numbers():
    golden = json.loads(GOLDEN.read_text())
    got = compute()
    assert got["version"] == golden["version"], "FEATURE_VERSION changed: regenerate the golden file"
    for s in STREAMS:
        g, x = golden[s], got[s]
        assert (x["dim"], x["tokens"]) == (g["dim"], g["tokens"]), s
        # float16 storage: a few 1e-3 of slack; a real change moves these by far more
        assert abs(x["norm"] - g["norm"]) <= 2e-3 * max(1.0, g["norm"]), (s, x["norm"], g["norm"])
        np.testing.assert_allclose(x["head"], g["head"], atol=2e-3, err_msg=(
            f"{s} features changed without a FEATURE_VERSION bump (dhumor/encoders/features.py)"))


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(compute(), indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
