"""Stored and generated text made inert before a page shows it.

Reviewer names, notes, edited captions, file names and model explanations (a caption can steer
the model into writing markup) are shown back to other reviewers in Markdown. :func:`md` escapes
them so that they are read, never rendered: no HTML, no links or images (a remote image is a
tracking pixel), no emphasis that changes what a verdict looks like.

>>> md("<img src=x onerror=alert(1)> **bold** [link](http://evil)")
'&lt;img src=x onerror=alert\\\\(1\\\\)&gt; \\\\*\\\\*bold\\\\*\\\\* \\\\[link\\\\]\\\\(http://evil\\\\)'
"""
from __future__ import annotations

import html
import re

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def md(text) -> str:
    """``text`` escaped for Markdown: HTML entities, then every Markdown punctuation backslashed."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(str(text if text is not None else ""), quote=False))
