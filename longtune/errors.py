"""The one error type a longtune job raises for a problem the user can fix, and how a
failure deep inside Ray is reduced to the line that explains it.

Every module's own error (ConfigError, DataError, ModelError, TrainingSetupError, EvalError,
ExportError, TuneSetupError) derives from ``LongtuneError``; the command line catches it once
(``longtune.cli.main``) and prints one line.
"""

from __future__ import annotations


class LongtuneError(Exception):
    """A job cannot go on as configured; the message, one line, says why and what to change."""


def one_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (its type's name when it has none)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def root_cause(exc: BaseException) -> str:
    """``Type: last line`` of the innermost error, through ``raise ... from`` chains and Ray's
    task/actor error wrappers (which keep the original in ``.cause``)."""
    while True:
        inner = exc.__cause__ or getattr(exc, "cause", None)
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
