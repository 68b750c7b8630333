"""The demo's users: a JSON file of names, roles and argon2 password hashes (argon2-cffi).

Made with ``dhumor users add FILE NAME [--role reviewer|admin]`` and read by ``dhumor demo --auth FILE``.
Roles: ``reviewer`` (score uploads, review memes) and ``admin`` (also opens queues and exports verdicts).
The file is written atomically and readable by its owner only; it never holds a password.

>>> import tempfile, os
>>> f = os.path.join(tempfile.mkdtemp(), "users.json")
>>> add_user(f, "ana", "a long passphrase", role="admin")  # True: a new user
True
>>> users = Users.load(f)
>>> users.check("ana", "a long passphrase"), users.check("ana", "wrong"), users.role("ana")
(True, False, 'admin')
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from dhumor.errors import ConfigError
from dhumor.util.files import atomic_write

log = logging.getLogger("dhumor")
ROLES = ("reviewer", "admin")
# What each role may do; the demo's handlers check these server-side (gr.Request.username).
PERMISSIONS = {"reviewer": {"score", "review"}, "admin": {"score", "review", "open_queue", "export"}}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD = 8


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()  # argon2id with the library's current recommended cost


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise ConfigError(f"user name {name!r}: use 1-64 letters, digits, '_', '.', '@' or '-', starting with a "
                          f"letter or digit")
    return name


@dataclass
class Users:
    """The users of one file: name -> {"role", "hash"}."""

    path: str
    users: dict[str, dict]

    @classmethod
    def load(cls, path: str | Path) -> "Users":
        """Read ``path``; a missing, unreadable or malformed file is a :class:`ConfigError` naming it."""
        path = Path(path)
        try:
            import argon2  # noqa: F401
        except ImportError:
            raise ConfigError("sign-in needs argon2-cffi: pip install 'dhumor[demo]'") from None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no users file here (make one with `dhumor users add {path} NAME`)") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable users file ({e})") from None
        users = data.get("users") if isinstance(data, dict) else None
        if not isinstance(users, dict) or any(
                not isinstance(u, dict) or u.get("role") not in ROLES or not str(u.get("hash", "")).startswith("$argon2")
                for u in users.values()):
            raise ConfigError(f"{path}: not a dhumor users file (each user needs a role in {list(ROLES)} and an "
                              f"argon2 hash; make it with `dhumor users add`)")
        for name in users:  # a hand-edited file is held to what `users add` accepts
            check_name(name)
        folded = [n.casefold() for n in users]
        if len(set(folded)) != len(folded):
            raise ConfigError(f"{path}: two users differ only in letter case; the audit trail could not tell "
                              f"them apart: remove one (`dhumor users remove {path} NAME`)")
        if path.stat().st_mode & 0o077:
            log.warning("%s: readable by other users of this machine (its password hashes): chmod 600 %s",
                        path, path)
        return cls(str(path), users)

    def check(self, name: str, password: str) -> bool:
        """Whether ``password`` is ``name``'s (an unknown name costs the same time as a wrong password)."""
        from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

        user = self.users.get(name or "")
        stored = user["hash"] if user else _DUMMY_HASH()
        try:
            ok = _hasher().verify(stored, password or "")
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        return ok and user is not None

    def role(self, name: str | None) -> str | None:
        user = self.users.get(name or "")
        return user["role"] if user else None

    def may(self, name: str | None, action: str) -> bool:
        return action in PERMISSIONS.get(self.role(name) or "", set())

    def __len__(self) -> int:
        return len(self.users)


_dummy: list[str] = []


def _DUMMY_HASH() -> str:  # noqa: N802 - a constant computed once, on first use
    if not _dummy:
        _dummy.append(_hasher().hash("not a password of anyone"))
    return _dummy[0]


def _read_raw(path: Path) -> dict:
    if not path.exists():
        return {"users": {}}
    Users.load(path)  # refuse to rewrite a file that is not ours
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: Path, data: dict) -> None:
    """Atomic and owner-only (0600 from the start: the hashes are never readable by others)."""
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o600)


def add_user(path: str | Path, name: str, password: str, role: str = "reviewer") -> bool:
    """Add ``name`` to the users file at ``path`` (made if missing), or replace their password and role.
    Returns True when the user is new."""
    check_name(name)
    if role not in ROLES:
        raise ConfigError(f"role {role!r}: one of {list(ROLES)}")
    if len(password or "") < MIN_PASSWORD:
        raise ConfigError(f"the password must have at least {MIN_PASSWORD} characters")
    path = Path(path)
    data = _read_raw(path)
    new = name not in data["users"]
    clash = [n for n in data["users"] if n != name and n.casefold() == name.casefold()]
    if clash:  # `ana` and `ANA` would be two people to the demo and one to a reader of the audit trail
        raise ConfigError(f"{path}: user {clash[0]!r} exists; names may not differ only in letter case")
    data["users"][name] = {"role": role, "hash": _hasher().hash(password)}
    _write(path.resolve(), data)  # a linked users file: the file the demo reads gets the user
    return new


def remove_user(path: str | Path, name: str) -> None:
    path = Path(path)
    data = _read_raw(path)
    if not path.exists() or name not in data["users"]:
        raise ConfigError(f"{path}: no user {name!r} (users: {', '.join(sorted(data['users'])) or 'none'})")
    del data["users"][name]
    _write(path.resolve(), data)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
