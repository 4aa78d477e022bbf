"""The one exception type that means "the user gave us something we cannot use"."""


class UserError(Exception):
    """Bad input (file, field, name, value). The CLI prints the message and exits with status 2.

    Raised instead of a traceback so that a typo in a path or a malformed line reads as one clear
    sentence naming what to fix, and so tests can tell bad input from a bug.
    """
