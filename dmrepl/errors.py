"""Errors of the policy layer: a message for the user and a hint of what to do."""


class DmreplError(Exception):
    """An operation refused or failed; nothing was changed unless the message says so."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint
