"""The one exception type that means "the user gave us something we cannot use"."""

import difflib


class UserError(Exception):
    """Bad input (file, field, name, value). The CLI prints the message and exits with status 2.

    Raised instead of a traceback so that a typo in a path or a malformed line reads as one clear
    sentence naming what to fix, and so tests can tell bad input from a bug.
    """


def suggest(name: str, known: list[str]) -> str:
    """'; did you mean X?' for the closest known name, or '' when none is close.

    A typo in a model or reward name otherwise reads like a missing download; naming the
    likely intended spelling turns a minute of guessing into one edit.
    """
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
