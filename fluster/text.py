"""Text from outside (a build's output, an app's log, a stored record) made safe to print.

A build step or an app can write any bytes. Printed raw on an operator's terminal, an
escape sequence can retitle the window, move the cursor over earlier lines, hide text or
(on some terminals) answer back as if typed; bidirectional overrides make a line read
differently from what it says. `printable` keeps the words and drops the rest: escape
sequences whole, every other control character (a tab becomes a space), and the
invisible formatting characters that reorder text.
"""

from __future__ import annotations

import re
import unicodedata

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ESC \), DCS/SOS/PM/APC (ESC P|X|^|_ ... ESC \),
# and the two-character escapes (ESC followed by one byte).
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"
    r"|\x1b[ -~]?"
    r"|\x9b[0-?]*[ -/]*[@-~]"
)


def _kept(char: str) -> bool:
    category = unicodedata.category(char)
    return not (category == "Cc" or category == "Cf" or category in ("Zl", "Zp"))


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """`text` without escape sequences and control characters (tabs become spaces);
    with `keep_newlines`, line breaks stay (as `\\n`)."""
    if text.isprintable():
        return text
    text = _ESCAPES.sub("", text.replace("\r\n", "\n"))
    out = []
    for char in text:
        if char == "\t":
            out.append(" ")
        elif (char == "\n" and keep_newlines) or _kept(char):
            out.append(char)
    return "".join(out)
