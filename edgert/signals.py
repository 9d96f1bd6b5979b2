"""One signal policy for every command: SIGINT, SIGTERM and SIGHUP all become an exception
(`Interrupted`, a KeyboardInterrupt), so that the same cleanup runs whichever one arrives, and
each is also recorded, so that code which swallows KeyboardInterrupt (coremltools has bare
`except:` clauses) cannot lose it: writers call `raise_pending()` before anything is
committed, and the interrupted command still exits 128 + signal number leaving nothing."""

from __future__ import annotations

import signal
import sys

POLICY = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_pending: int | None = None


class Interrupted(KeyboardInterrupt):
    """A signal asked the process to stop; `exit_code` is 128 + its number (130 for Ctrl-C)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def _handler(signum, frame):
    global _pending
    _pending = signum
    raise Interrupted(signum)


def install() -> None:
    """Handle SIGINT, SIGTERM and SIGHUP as above (a signal the parent set to be ignored, as
    nohup does for SIGHUP, stays ignored) and forget any earlier pending one."""
    global _pending
    _pending = None
    if sys.unraisablehook is not _unraisable:
        _unraisable.default = sys.unraisablehook
        sys.unraisablehook = _unraisable
    for sig in POLICY:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _handler)


def _unraisable(info) -> None:
    """A signal that lands in a __del__ or a callback cannot propagate from there; it stays
    pending (raised again by `raise_pending`) instead of printing a traceback."""
    if not isinstance(info.exc_value, Interrupted):
        _unraisable.default(info)


def stop_requested(e: BaseException) -> bool:
    """Whether a KeyboardInterrupt asks the process to end (SIGTERM, SIGHUP) rather than a
    Ctrl-C that an interactive loop may take as "stop this reply"."""
    return getattr(e, "signum", signal.SIGINT) != signal.SIGINT


def pending() -> int | None:
    """The number of a signal received since `install`, or None."""
    return _pending


def raise_pending() -> None:
    """Raise `Interrupted` again if a signal arrived, even if its first raise was swallowed."""
    if _pending is not None:
        raise Interrupted(_pending)
