"""User-facing errors: one line, non-zero exit, no traceback unless --debug."""


# Control characters (a newline in a corrupt file's tensor name) are escaped: one line, always.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 127)}


class EdgertError(Exception):
    """An error caused by the user's input or environment, shown as one line."""

    exit_code = 1

    def __init__(self, message: object = "", *args):
        super().__init__(str(message).translate(_ESCAPES), *args)


class UnsupportedError(EdgertError):
    """A valid input that edgert does not (yet) support: architecture, tensor type."""

    exit_code = 2
