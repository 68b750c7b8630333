"""The interface every explanation backend implements: batched chat generation, optionally with an image."""
from __future__ import annotations

import base64
import io
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from PIL import Image


@dataclass
class GenerationRequest:
    system: str
    user: str
    image: Image.Image | None = None
    json_schema: dict | None = None  # structured output, for backends that can enforce it
    max_tokens: int = 400
    temperature: float = 0.2
    stop: tuple[str, ...] | None = None  # end the answer at any of these strings (not included)


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    error: str | None = None  # the backend failed (timeout, server error): not the model's fault


class Backend(ABC):
    """A model that answers chat requests. ``supports_images`` says whether it sees the meme itself;
    text-only backends get visual cues (an image classifier's labels) in the prompt instead."""

    name: str = "backend"
    supports_images: bool = False

    @abstractmethod
    def fingerprint(self) -> dict:
        """What identifies this backend's outputs (model id, revision, decoding settings): part of cache keys."""

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """One :class:`Generation` per request, in order; failures are reported in ``Generation.error``."""

    def stream(self, pull: Callable[[int], list[tuple[Any, GenerationRequest]]]) -> Iterator[tuple[Any, Generation]]:
        """Generate for requests as they come: ``pull(n)`` returns up to ``n`` new ``(key, request)``
        pairs (none: the caller has nothing more right now), and ``(key, generation)`` pairs come
        back as answers finish. This default sends batches to :meth:`generate`; backends that can
        refill a batch while it decodes (continuous batching) override it."""
        while True:
            batch = pull(1 << 30)  # all that is ready: generate() batches it its own way
            if not batch:
                return
            yield from zip([k for k, _ in batch], self.generate([r for _, r in batch]))


def chat_messages(req: GenerationRequest, with_image: bool, image_part: dict | None = None) -> list[dict]:
    """OpenAI-style messages; the image (when sent) goes first in the user turn."""
    content: str | list = req.user
    if with_image and req.image is not None:
        content = [image_part or {"type": "image"}, {"type": "text", "text": req.user}]
    return [{"role": "system", "content": req.system}, {"role": "user", "content": content}]


def image_data_url(img: Image.Image, max_side: int = 1024, quality: int = 90) -> str:
    """A JPEG data URL of the image, downscaled so its longest side is at most ``max_side``."""
    img = img.convert("RGB")
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
