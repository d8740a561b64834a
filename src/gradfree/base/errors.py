"""The one exception type that the CLI turns into a one-sentence error (no traceback)."""


class GradfreeError(Exception):
    """A user-facing failure: the message is one clear sentence saying what is wrong."""
