"""One exception type for every user-facing failure: the CLI prints its message on one line and exits non-zero."""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class LrdError(Exception):
    """A problem the user can fix: bad input, missing file, unsupported model. Never a bug."""

    exit_code = 2


_sigint_seen = False


def _remember_sigint(signum: int, frame: object) -> None:
    global _sigint_seen
    _sigint_seen = True
    raise KeyboardInterrupt


@contextmanager
def ctrl_c_wins() -> Iterator[None]:
    """Treat an error raised after Ctrl-C as the Ctrl-C itself.

    A SIGINT that lands inside native code (safetensors reading a tensor, torch building one) can surface as that
    library's own error, e.g. "could not determine the shape of object type 'torch.storage.UntypedStorage'". The
    user pressed Ctrl-C, so they must get the interrupt's exit code and resume hint, not a bogus "cannot read".
    The outermost use, in the main thread, swaps Python's default SIGINT handler for one that remembers the
    signal, and restores it (and forgets the signal) on exit; an ignored SIGINT stays ignored.
    """
    global _sigint_seen
    own = (threading.current_thread() is threading.main_thread()
           and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if own:
        _sigint_seen = False
        signal.signal(signal.SIGINT, _remember_sigint)
    try:
        yield
    except Exception:
        if _sigint_seen:
            raise KeyboardInterrupt from None
        raise
    finally:
        if own:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _sigint_seen = False
