"""The one exception type of longtune.eval (a module of its own, so the package's modules
import it without importing the package that imports them)."""

from longtune.errors import LongtuneError


class EvalError(LongtuneError, ValueError):
    """An evaluation that cannot run as configured (no held-out text, a stride longer than a
    length, ...); the message says why in one line."""
