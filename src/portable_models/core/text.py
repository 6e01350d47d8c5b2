"""Printing strings that came from a bundle: a contract is untrusted input, and its strings
(the bundle's name, route and output names, error messages, runtime labels) reach terminals,
Markdown, HTML and JUnit XML.

:func:`escape` renders every character that could act rather than show — C0 and C1
controls (ESC sequences, carriage returns, newlines, NUL), DEL, lone surrogates, Unicode
line and paragraph separators, bidirectional overrides and isolates, the XML
non-characters U+FFFE/U+FFFF — as a visible escape (``\\x1b``, ``\\n``, ``\\u202e``). What
it returns is one line of printable text that is also valid in XML 1.0 (the XML writer
still escapes ``&``, ``<`` and ``"`` itself). :func:`escape_md` and :func:`escape_html` add
what Markdown and HTML need on top.
"""

from __future__ import annotations

import html
import re

__all__ = ["escape", "escape_md", "escape_html"]

_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f"          # C0, DEL, C1 (ESC, CSI, NUL, CR, LF, tab …)
    "\u061c\u200e\u200f"           # bidi marks (ALM, LRM, RLM)
    "\u202a-\u202e\u2066-\u2069"   # bidi embeddings, overrides and isolates
    "\u2028\u2029"                 # line and paragraph separators
    "\ud800-\udfff"                # surrogates: never valid alone in a str that is printed
    "\ufffe\uffff]"                # not characters (XML 1.0 refuses them)
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: ASCII punctuation that Markdown (CommonMark, GitHub tables) gives a meaning to here:
#: emphasis, code, links (``[``), inline HTML and autolinks (``<``), cells (``|``), headings,
#: strikethrough, and entity references (``&#x202e;`` would bring back what was escaped).
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~&])")


def _visible(match: re.Match[str]) -> str:
    ch = match.group(0)
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(value: object, *, limit: int | None = None) -> str:
    """``value`` as one line of visible text: controls, bidi overrides and lone surrogates
    written as escapes. ``limit``: at most that many characters of ``value`` are kept
    (an ellipsis marks the cut)."""
    s = value if isinstance(value, str) else str(value)
    cut = limit is not None and len(s) > limit
    if cut:
        s = s[:limit]
    out = _UNSAFE.sub(_visible, s)
    return out + "…" if cut else out


def escape_md(value: object, *, limit: int | None = None) -> str:
    """:func:`escape`, then Markdown's special punctuation backslash-escaped: the text shows
    as it is in a table cell, a list item or a heading, and cannot start a heading, a link,
    inline HTML or a new table cell."""
    return _MD_SPECIAL.sub(r"\\\1", escape(value, limit=limit))


def escape_html(value: object, *, limit: int | None = None) -> str:
    """:func:`escape`, then HTML's special characters (quotes included) as entities."""
    return html.escape(escape(value, limit=limit), quote=True)
