"""Errors a user can cause and fix. The CLI prints them as one line, never as a traceback."""


class UserError(Exception):
    """A problem with the user's model, files or options.

    exit_code follows click's convention: 2 for usage errors (bad option, unknown node, unreadable model),
    1 for a run that completed but whose result failed a check.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
