"""What the ``kvckpt`` command prints: every line redacted, decoded and free of terminal escapes.

Names of checkpoints print as the characters they are (StoreURL.display), measured in terminal
columns in tables; only control characters are escaped.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote

from kvckpt.humanize import printable
from kvckpt.urls import redact

_ESCAPED_UTF8 = re.compile(r"(?:%[C-Fc-f][0-9A-Fa-f](?:%[89ABab][0-9A-Fa-f])+)+")


def out(text: str = "") -> None:
    """Free text (messages, what the user typed): passwords redacted, escaped UTF-8 decoded."""
    show(readable(redact(text)))


def show(text: str) -> None:
    """Text made of StoreURL.display() names, redacted as they were built and shown as they are:
    decoding or redacting it again could change a name (an '@' or a '%' in it)."""
    print(printable_lines(text), flush=True)


def printable_lines(text: str) -> str:
    """No terminal escape (or other control character) from a store reaches the terminal."""
    return "\n".join(printable(line, limit=100_000) for line in text.split("\n"))


def emit_json(value: Any) -> None:
    out(json.dumps(value, indent=2, ensure_ascii=False))


def readable(text: str) -> str:
    """Percent-escaped UTF-8 (a non-ASCII namespace in a URL) shown as the characters it spells."""
    return _ESCAPED_UTF8.sub(_decoded, text) if "%" in text else text


def _decoded(match: re.Match[str]) -> str:
    try:
        return unquote(match.group(), errors="strict")
    except UnicodeDecodeError:
        return match.group()
