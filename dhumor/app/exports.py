"""The review log's downloads, as both tabs offer them: role-checked, one file per user."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from dhumor.app.access import Access, Forbidden
from dhumor.app.text import md


def export_for_user(access: Access, request, folder: str | Path, prefix: str, suffix: str,
                    write: Callable[[Path], str]) -> tuple[str | None, str]:
    """``write`` the export to ``folder/<prefix>-<user><suffix>`` if the signed-in user's role may export.

    ``write`` writes the file and returns what to tell the user. Returns the path (``None`` when
    nothing was written) and a status line, as a ``gr.File`` and a ``gr.Markdown`` take them."""
    try:
        access.require(request, "export")
    except Forbidden as e:
        return None, f"**Not allowed:** {md(e)}"
    # One file per user, replaced by each export: clicks do not pile files up (Gradio serves a copy
    # from its own cache, which the demo's delete_cache empties).
    out = Path(folder) / f"{prefix}-{access.user(request) or 'local'}{suffix}"
    try:
        message = write(out)
    except ValueError as e:  # the log cannot make this export (e.g. verdicts that fit no schema)
        return None, f"**Export failed:** {md(e)}"
    return str(out), message
