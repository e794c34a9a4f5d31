"""User-facing errors: one line that says what went wrong and what to do."""


class NcaTilesError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    The CLI prints its message as one line and exits non-zero, without a traceback.
    """
