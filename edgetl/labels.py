"""What a label may be. Labels are class folder names; they go one per line into labels.txt, into the
golden images' file names, into JSON, TFLite metadata and the apps' screens, so a name that would break
one of those (a newline, a path separator, `..`, a control character, bytes that are not UTF-8) is
refused when the folder is listed, before any training, and again wherever edgetl reads labels from a file.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable

from edgetl.errors import UserError

VALID = "printable characters, no / or \\, no newline or other control character, not '.' or '..', UTF-8"
# Characters that end a line somewhere labels.txt is read (Kotlin readLines, Swift, Python splitlines).
_LINE_BREAKS = {"\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"}


def shown(name: str) -> str:
    """A name as a user can read it in one line: escapes for control characters, \\xNN for non-UTF-8 bytes."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return repr(os.fsencode(name))[1:]
    return repr(name)


def label_problem(name: object) -> str | None:
    """What makes `name` unusable as a label, or None when it is fine."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not text"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if not name.strip():
        return "is empty or only spaces"
    if name in (".", ".."):
        return f"is {name!r}"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    for char in name:
        if char in _LINE_BREAKS or unicodedata.category(char) in ("Cc", "Cs"):
            return f"holds a control character ({char!r})"
    return None


def check_labels(labels: Iterable[object], where: str, fix: str) -> list[str]:
    """`labels` if every one is usable and they are distinct; else one UserError line naming the first bad one.

    `where` says where they came from (a data folder, a manifest); `fix` what the user can do about it.
    """
    labels = list(labels)
    for name in labels:
        problem = label_problem(name)
        if problem:
            text = shown(name) if isinstance(name, str) else repr(name)
            raise UserError(f"label {text} in {where} {problem}; {fix} (valid: {VALID})")
    seen: set[object] = set()
    for name in labels:
        if name in seen:
            raise UserError(f"label {shown(str(name))} appears twice in {where}; labels must be distinct")
        seen.add(name)
    return labels  # type: ignore[return-value]
