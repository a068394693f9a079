"""Small helpers for messages a user reads: warnings printed once per job (on process 0)
and the first line of an exception, for one-line errors."""

from __future__ import annotations

import sys

import jax


def warn(message: str) -> None:
    """Prints `message` to stderr on process 0 only (every process would repeat it)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of `err`'s message, at most `limit` characters ('' when empty)."""
    text = str(err).strip().splitlines()
    return text[0][:limit] if text else ""
