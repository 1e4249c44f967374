"""The project's error for expected failures: a bad file, config, argument or environment that the user can fix.

`omniret` commands print such an error as one line on stderr and exit with status 2 (OMNIRET_DEBUG=1 keeps the
traceback). Code raises it where it knows what went wrong, so the message names the file or field; anything else
that escapes is a bug and keeps its traceback."""
from __future__ import annotations

__all__ = ["InputError", "RunLockedError"]


class InputError(ValueError):
    """A file, config or argument the command cannot use; the message names it and says what to do."""


class RunLockedError(InputError):
    """Another process holds the lock of a run directory."""
