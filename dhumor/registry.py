"""Registries: OCR engines, explanation backends and encoder families register themselves once.

A :class:`Registry` maps a name to its factory, the pip extra that installs it, the modules it
needs and a preflight check. CLI choices, preflight and help text are read from the registries, so
adding an engine is one new module that calls :meth:`Registry.register` (plus its pip extra).

Entries are found in three places, in this order: modules that registered on import (the built-in
ones, listed by the registry's owner), and the ``entry_points`` group of the registry (plugins
installed as separate packages: ``[project.entry-points."dhumor.ocr_engines"] myengine = "pkg.mod"``;
the module is imported and registers itself). Registering never imports a heavy library: factories
import what they need when called.

>>> r = Registry("widget")
>>> @r.register("plain", help="a plain widget")
... def make_plain(**kw):
...     return ("plain", kw)
>>> r.names(), r.create("plain", size=2)
(['plain'], ('plain', {'size': 2}))
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import pkgutil
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable

from dhumor.errors import ConfigError

log = logging.getLogger("dhumor")


@dataclass(frozen=True)
class Entry:
    """One registered implementation."""

    name: str
    factory: Callable[..., Any]
    extra: str | None = None  # `pip install 'dhumor[extra]'` installs what it needs
    requires: tuple[str, ...] = ()  # importable modules it needs (checked before anything loads)
    check: Callable[..., None] | None = None  # further preflight (weights, settings); raises ConfigError
    help: str = ""
    meta: dict = field(default_factory=dict)  # anything else the owner wants to keep beside the entry


def installed(module: str) -> bool:
    """``module`` can be imported (found on the path), without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class Registry:
    """Name → :class:`Entry` for one kind of component (``kind`` names it in messages)."""

    def __init__(self, kind: str, builtins: Iterable[str] = (), scan: str | None = None, group: str | None = None,
                 flag: str | None = None, fallback: str | None = None):
        """``builtins``: modules that register this kind's built-in entries when imported; ``scan``: a
        package every module of which is such a module (a new file there is a new entry); ``group``:
        the entry-points group plugins register under; ``flag``: the CLI option that picks an entry;
        ``fallback``: what a user can do instead when an entry is not installed (for messages)."""
        self.kind, self.group, self.flag, self.scan, self.fallback = kind, group, flag, scan, fallback
        self._builtins = tuple(builtins)
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, *, extra: str | None = None, requires: Iterable[str] = (),
                 check: Callable[..., None] | None = None, help: str = "", **meta):
        """Decorator: register ``factory`` under ``name`` (a second registration of a name replaces it)."""
        def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
            self._entries[name] = Entry(name, factory, extra, tuple(requires), check, help, meta)
            return factory
        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        mods = list(self._builtins)
        if self.scan:
            pkg = importlib.import_module(self.scan)
            mods += [f"{self.scan}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
        for mod in mods:
            importlib.import_module(mod)
        if self.group:
            for ep in entry_points(group=self.group):
                try:
                    obj = ep.load()
                except Exception as e:  # a broken plugin must not break the built-in entries
                    log.warning("the %s plugin %r (%s) failed to load: %s", self.kind, ep.name, ep.value, e)
                    continue
                if callable(obj) and ep.name not in self._entries:  # an entry point naming a factory
                    self._entries[ep.name] = Entry(ep.name, obj)

    def names(self) -> list[str]:
        """Every registered name, built-ins first."""
        self._load()
        return list(self._entries)

    def get(self, name: str) -> Entry:
        """The entry of ``name``; ConfigError listing the choices when there is none."""
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            how = f" ({self.flag})" if self.flag else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{how}: choose one of {', '.join(self._entries)}") from None

    def missing(self, name: str) -> list[str]:
        """The modules ``name`` needs that are not installed."""
        return [m for m in self.get(name).requires if not installed(m)]

    def preflight(self, name: str, **settings) -> None:
        """Everything ``name`` needs is there (modules, then its own check): else one ConfigError naming the fix."""
        entry = self.get(name)
        missing = self.missing(name)
        if missing:
            fix = f"pip install 'dhumor[{entry.extra}]'" if entry.extra else f"pip install {' '.join(missing)}"
            also = f", or {self.fallback}" if self.fallback else ""
            raise ConfigError(f"the {self.kind} {name} is not installed (missing {', '.join(missing)}): {fix}{also}")
        if entry.check is not None:
            entry.check(**settings)

    def create(self, name: str, **kwargs) -> Any:
        """``factory(**kwargs)`` of the entry ``name``."""
        return self.get(name).factory(**kwargs)

    def help(self) -> str:
        """One line per entry: ``name: help``."""
        return "; ".join(f"{e.name}: {e.help}" if e.help else e.name for e in (self.get(n) for n in self.names()))
