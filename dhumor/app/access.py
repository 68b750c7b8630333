"""Who is asking, and may they: the signed-in user of a Gradio request and their role's permissions.

Without a users file (a demo on loopback for one person) everyone may do everything and names a
reviewer in a text box; with one, the name is the signed-in user's and every handler checks the
role server-side, whatever the page shows or hides.
"""
from __future__ import annotations

from dhumor.app.auth import Users


class Forbidden(Exception):
    """The signed-in user's role does not allow this action."""


class Access:
    def __init__(self, users: Users | None):
        self.users = users

    @property
    def signed_in(self) -> bool:
        return self.users is not None

    def user(self, request) -> str | None:
        """The signed-in user's name (None without sign-in)."""
        if self.users is None:
            return None
        return getattr(request, "username", None) if request is not None else None

    def may(self, request, action: str) -> bool:
        return self.users is None or self.users.may(self.user(request), action)

    def require(self, request, action: str) -> None:
        if not self.may(request, action):
            who = self.user(request) or "a visitor"
            raise Forbidden(f"{who} ({self.users.role(self.user(request)) or 'not signed in'}) may not {action.replace('_', ' ')}")

    def reviewer(self, request, typed: str | None = "") -> str:
        """The name a verdict carries: the signed-in user, else what was typed."""
        return self.user(request) or "" if self.users is not None else (typed or "").strip()


def with_request(fn):
    """Mark ``fn``'s ``request`` parameter as Gradio's request, so Gradio passes it in. (An annotation
    would do, but under ``from __future__ import annotations`` Gradio cannot resolve ``gr.Request``
    when ``gr`` is imported inside a function, and then silently passes nothing.)"""
    import gradio as gr

    fn.__annotations__ = {**getattr(fn, "__annotations__", {}), "request": gr.Request}
    return fn
