"""User-facing errors: one line, non-zero exit, no traceback unless --debug."""


class EdgertError(Exception):
    """An error caused by the user's input or environment, shown as one line."""

    exit_code = 1


class UnsupportedError(EdgertError):
    """A valid input that edgert does not (yet) support: architecture, tensor type."""

    exit_code = 2
