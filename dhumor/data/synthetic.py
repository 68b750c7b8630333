"""Generated memes: captions rendered on images we may ship (scikit-image's sample data, or noise).

Used for the repository's example memes and for test fixtures; never real meme datasets.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_FONT_CANDIDATES = ["/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
                    "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf"]


def _font(size: int):
    for f in _FONT_CANDIDATES:
        if Path(f).exists():
            return ImageFont.truetype(f, size)
    return ImageFont.load_default(size=size)


def render_meme(img: Image.Image, top: str = "", bottom: str = "", width: int = 512) -> Image.Image:
    """Classic meme layout: white upper-case text with a black outline at the top and bottom."""
    img = img.convert("RGB")
    h = int(img.height * width / img.width)
    img = img.resize((width, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    size = max(18, width // 14)
    font = _font(size)
    for text, anchor_top in ((top, True), (bottom, False)):
        if not text:
            continue
        lines = textwrap.wrap(text.upper(), width=max(8, int(width / (size * 0.62))))
        line_h = int(size * 1.15)
        y = 8 if anchor_top else h - 8 - line_h * len(lines)
        for line in lines:
            w = draw.textlength(line, font=font)
            draw.text(((width - w) / 2, y), line, font=font, fill="white", stroke_width=max(2, size // 12),
                      stroke_fill="black")
            y += line_h
    return img


def sample_image(name: str) -> Image.Image:
    """A scikit-image sample picture (bundled with the package, no download)."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return Image.fromarray(arr[..., :3].astype(np.uint8))


_HARMFUL_WORDS = ["hate", "kill", "stupid", "disease", "virus", "blame", "attack", "ugly"]
_BENIGN_WORDS = ["happy", "coffee", "weekend", "puppy", "sunshine", "garden", "music", "friends"]
_TARGETS = ["individual", "organization", "community", "society"]


def noise_image(rng: np.random.Generator, harmful: bool, size: int = 96) -> Image.Image:
    """A random picture whose colour carries a little label signal (red-ish for harmful)."""
    base = np.array([170, 60, 60] if harmful else [60, 110, 170], dtype=float)
    arr = rng.normal(base, 40, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def write_fixture(out_dir: str | Path, n: int = 32, seed: int = 0, fmt: str = "harmeme") -> Path:
    """A tiny labelled dataset in HarMeme jsonl (``fmt="harmeme"``) or D-HUMOR csv (``fmt="dhumor"``) form.
    Captions and colours carry the labels, so a short training run can learn them."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        level = int(rng.choice(3, p=[0.5, 0.3, 0.2]))
        harmful = level > 0
        words = rng.choice(_HARMFUL_WORDS if harmful else _BENIGN_WORDS, size=3)
        caption = " ".join(words)
        img = render_meme(noise_image(rng, harmful), caption, width=160)
        mid = f"meme_{i:03d}"
        img.save(out_dir / "images" / f"{mid}.png")
        rows.append((mid, caption, level, int(rng.integers(4 if fmt == "harmeme" else 6))))
    if fmt == "harmeme":
        levels = ["not harmful", "somewhat harmful", "very harmful"]
        path = out_dir / "memes.jsonl"
        with open(path, "w") as fh:
            for mid, caption, level, tgt in rows:
                labels = [levels[level]] + ([_TARGETS[tgt]] if level else [])
                fh.write(json.dumps({"id": mid, "image": f"{mid}.png", "labels": labels, "text": caption}) + "\n")
        return path
    import csv

    path = out_dir / "memes.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["post id", "Text", "Explanation1", "Dark", "Target", "Intensity"])
        for mid, caption, level, tgt in rows:
            dark = int(level > 0)
            w.writerow([mid, caption, f"The meme jokes about {caption}.", dark, tgt if dark else "",
                        (level - 1 + (rng.random() < 0.3)) if dark else ""])
    return path


def write_mmf_fixture(root: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A tiny clone of ``di-dimitrov/mmf``'s Harm-C layout (annotations/{train,val,test}.jsonl +
    images/), for testing ``dhumor data harmeme``. Returns ``root``."""
    sizes = sizes or {"train": 12, "val": 4, "test": 4}
    base = Path(root) / "data" / "datasets" / "memes" / "defaults"
    (base / "annotations").mkdir(parents=True, exist_ok=True)
    flat = write_fixture(base / ".flat", n=sum(sizes.values()), seed=seed, fmt="harmeme")
    rows = [json.loads(line) for line in flat.read_text().splitlines()]
    (flat.parent / "images").rename(base / "images")
    flat.unlink()
    (flat.parent).rmdir()
    start = 0
    for split, n in sizes.items():
        with open(base / "annotations" / f"{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows[start:start + n])
        start += n
    return Path(root)
