"""Explanation backends: every backend registers here once, with the pip extra that installs it,
what it needs and its preflight check; ``--explain`` choices, preflight and create_backend read
:data:`BACKENDS`. Installed packages add backends through the entry-points group
``dhumor.explain_backends``. Factories import their heavy libraries only when called."""
from __future__ import annotations

from pathlib import Path

from dhumor.errors import ConfigError
from dhumor.registry import Registry, installed

BACKENDS = Registry("explanation backend", group="dhumor.explain_backends", flag="--explain",
                    fallback="pass --explain none")
NONE = "none"


def _check_offline(model: str | None = None, **_) -> None:
    if not installed("llama_cpp") and not (installed("gguf") and installed("accelerate")):
        raise ConfigError("the offline explainer needs llama.cpp: `make setup-explain` in a checkout, or "
                          "pip install 'dhumor[explain]' (or --explain none)")
    if model:
        if not Path(model).is_file():
            raise ConfigError(f"--explain-model {model}: no such GGUF file")
        with open(model, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ConfigError(f"--explain-model {model}: not a GGUF model file (the offline explainer runs "
                                  f"llama.cpp GGUF models)")
        return
    from dhumor.encoders.weights import smollm2_gguf
    from dhumor.errors import DHumorError

    try:
        smollm2_gguf()
    except DHumorError as e:
        raise ConfigError(str(e)) from None


@BACKENDS.register("offline", extra="explain", check=_check_offline,
                   help="SmolLM2-135M on llama.cpp, this machine, text only (a weak stand-in for a VLM)")
def offline(model=None, threads=None, sequences=8, **_):
    from dhumor.explain.backends.offline import offline_backend

    return offline_backend(model, n_threads=threads, sequences=sequences)


def _check_openai(model: str | None = None, base_url: str | None = None, **_) -> None:
    from dhumor.explain.backends import openai_settings

    openai_settings.check(model, base_url)


@BACKENDS.register("openai", extra="explain", requires=("requests",), check=_check_openai,
                   help="any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, hosted APIs)")
def openai(model=None, base_url=None, api_key=None, concurrency=4, send_images=True, timeout=None, **_):
    from dhumor.explain.backends.openai_compat import OpenAIBackend

    return OpenAIBackend(model=model, base_url=base_url, api_key=api_key, concurrency=concurrency,
                         send_images=send_images, timeout=timeout)


def _check_transformers(model: str | None = None, **_) -> None:
    if not model:
        raise ConfigError("the transformers explainer needs --explain-model (a hub id or a local VLM directory)")


@BACKENDS.register("transformers", requires=("transformers",), check=_check_transformers,
                   help="a local vision-language model through transformers (--explain-model: hub id or folder)")
def transformers(model=None, batch_size=4, **_):
    from dhumor.explain.backends.transformers_vlm import TransformersVLMBackend

    return TransformersVLMBackend(model, batch_size=batch_size)


def backend_choices(with_none: bool = True) -> list[str]:
    """What ``--explain`` accepts."""
    return [NONE, *BACKENDS.names()] if with_none else BACKENDS.names()


def check_backend(name: str | None, model: str | None = None, base_url: str | None = None) -> None:
    """Preflight: the backend is known, installed and configured (ConfigError naming the fix)."""
    if name in (None, "", NONE):
        return
    BACKENDS.preflight(name, model=model, base_url=base_url)
