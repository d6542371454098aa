"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and keeps its
traceback. Messages name the value received and what would be valid.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a path, a flag value, a file that is not what it should be."""

    exit_code = 2


def one_of(value: object, valid: list[str] | tuple[str, ...], what: str) -> str:
    """Message for an unknown choice, listing the valid ones."""
    return f"unknown {what} {value!r}; valid: {', '.join(valid)}"
