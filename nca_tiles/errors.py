"""User-facing errors: one line that says what went wrong and what to do."""


class NcaTilesError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    The CLI prints its message as one line and exits non-zero, without a traceback.
    """


class Stopped(KeyboardInterrupt):
    """A job stopped cleanly on a signal (Ctrl-C's SIGINT, or SIGTERM from a scheduler or
    ``timeout``) after saving what resumes it. The CLI exits with 128 + ``signum``, as a shell
    reports a process the signal ended."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
