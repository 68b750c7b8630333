"""The settings of an OpenAI-compatible explanation server, read and checked in one place: the
backend uses them, and :mod:`dhumor.inference.preflight` calls the same functions so a bad URL, timeout or
key is one line (exit 2) before anything loads, not a batch of failed rows. No third-party imports:
preflight runs before the backend's packages are known to be installed."""
from __future__ import annotations

import math
import os
import re
from urllib.parse import urlsplit

from dhumor.errors import ConfigError

DEFAULT_TIMEOUT = 60.0


def base_url(arg: str | None) -> str:
    """``arg``, else ``$DHUMOR_OPENAI_BASE_URL``, else ``$OPENAI_BASE_URL``: an http(s) URL with a host."""
    url = (arg or os.environ.get("DHUMOR_OPENAI_BASE_URL") or os.environ.get("OPENAI_BASE_URL") or "").strip()
    if not url:
        raise ConfigError("the openai explainer needs a server: pass --base-url http://HOST:PORT/v1 "
                          "or set DHUMOR_OPENAI_BASE_URL")
    why = None
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            why = "it must start with http:// or https://"
        elif not parts.hostname:
            why = "it names no host"
        elif parts.port == 0:
            why = "port 0 is not a server's port"
        elif parts.query or parts.fragment or "?" in url or "#" in url:
            why = "a base URL has no ?query or #fragment; pass an API key through DHUMOR_OPENAI_API_KEY"
        elif parts.path.rstrip("/").endswith("/chat/completions"):
            why = "give the base, e.g. http://HOST:PORT/v1; dhumor adds /chat/completions"
    except ValueError as e:  # a bad port number or a broken IPv6 literal
        why = str(e)
    if why and "@" in url:  # urllib's own words may quote the password ("Port could not be cast ... 'p4ss'")
        userinfo = url.split("//", 1)[-1].rsplit("@", 1)[0]
        for secret in sorted({userinfo, *re.split(r"[:/?#]", userinfo)}, key=len, reverse=True):
            why = why.replace(secret, "***") if secret else why
    if why:
        # The URL as typed may carry a secret (a ?key=, a user:password@): shown up to its path only.
        # A password may itself hold / ? # or @: everything up to the last @ goes.
        shown = re.split(r"[?#]", re.sub(r"^([^:/]*:?//?).*@", r"\1", url), maxsplit=1)[0]
        raise ConfigError(f"explanation server URL {shown!r} is not usable ({why}): pass --base-url "
                          f"http://HOST:PORT/v1 (or fix DHUMOR_OPENAI_BASE_URL)")
    return url.rstrip("/")


def model(arg: str | None) -> str:
    """``arg``, else ``$DHUMOR_OPENAI_MODEL``: the served model's name."""
    name = arg or os.environ.get("DHUMOR_OPENAI_MODEL")
    if not name:
        raise ConfigError("the openai explainer needs the served model's name: pass --explain-model NAME "
                          "or set DHUMOR_OPENAI_MODEL")
    return name


def timeout(arg: float | None) -> float:
    """``arg``, else ``$DHUMOR_OPENAI_TIMEOUT``, else 60: seconds, finite and above 0."""
    raw = arg if arg is not None else os.environ.get("DHUMOR_OPENAI_TIMEOUT") or DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    # An hour at most: past that a hung server is not bounded in any useful sense, and huge
    # values overflow the clocks the deadline is computed with.
    if not (0 < value <= 3600):
        source = "the timeout" if arg is not None else "DHUMOR_OPENAI_TIMEOUT"
        raise ConfigError(f"{source} must be a number of seconds above 0 and at most 3600, not {raw!r}")
    return value


def api_key(arg: str | None) -> str | None:
    """``arg``, else ``$DHUMOR_OPENAI_API_KEY``, else ``$OPENAI_API_KEY`` (None: local servers need none).
    A key with spaces, control or non-ASCII characters (a pasted newline) is refused without showing it
    (HTTP headers carry ASCII)."""
    key = arg or os.environ.get("DHUMOR_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if key and (not key.isascii() or not key.isprintable() or any(c.isspace() for c in key)):
        raise ConfigError("the explanation server's API key contains whitespace, control or non-ASCII characters "
                          "(a pasted newline?): fix DHUMOR_OPENAI_API_KEY / OPENAI_API_KEY")
    return key or None


def check(arg_model: str | None, arg_base_url: str | None) -> None:
    """Every setting of the openai backend is usable; else one :class:`ConfigError` naming every
    problem and its fix (not one per run)."""
    problems = []
    for read in (lambda: base_url(arg_base_url), lambda: model(arg_model), lambda: timeout(None),
                 lambda: api_key(None)):
        try:
            read()
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; and ".join(problems))
