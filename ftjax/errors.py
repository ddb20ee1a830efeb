"""The one error type users see: a one-line message that names the file or tensor and says what to do; and the
one line any other exception becomes at the command line (`describe`), naming the file it was reading or writing
where `about_file` recorded it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence


class FtjaxError(Exception):
    """A user-facing error. The CLI prints `ftjax: error: <message>` and exits with status 2.

    Messages are one line, name the offending file or tensor, and say what to do where that is useful.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # force one line


def finite(name: str, value: float) -> float:
    """`float(value)`, or FtjaxError naming `name` (a flag or argument) when the value is NaN or ±Inf: such a number
    would run to the end and write a NaN model, so it is refused before anything is computed."""
    x = float(value)
    if x != x or x in (float("inf"), float("-inf")):
        raise FtjaxError(f"{name} must be a finite number, got {value!r}")
    return x


def first_few(items: Sequence[str], shown: int = 3) -> str:
    """The first `shown` items joined by "; ", then "; and N more" for the rest (an error listing stays readable)."""
    more = f"; and {len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


@contextlib.contextmanager
def about_file(path: str | Path) -> Iterator[None]:
    """Record `path` on any exception other than FtjaxError raised inside (a third-party library failing to read
    or write it), unless an inner `about_file` already did; the exception propagates unchanged."""
    try:
        yield
    except FtjaxError:
        raise
    except Exception as e:
        if getattr(e, "ftjax_file", None) is None:
            e.ftjax_file = str(path)  # type: ignore[attr-defined]
            e.add_note(f"(while reading or writing {path})")
        raise


def describe(e: BaseException, limit: int = 300) -> str:
    """One line for an unexpected exception: "<ExcType> in <file>: <first line of the message>", the file being
    the one `about_file` recorded or an OSError's filename (omitted when unknown); at most `limit` characters of
    message. An exception raised `from` another is described by the innermost one (the specific error: Orbax's
    "error while reading array index" is raised from TensorStore's "byte range not valid")."""
    file = getattr(e, "ftjax_file", None) or getattr(e, "filename", None)
    while e.__cause__ is not None:
        e = e.__cause__
        file = file or getattr(e, "ftjax_file", None) or getattr(e, "filename", None)
    if isinstance(e, OSError) and e.strerror:
        message = e.strerror if file is not None else str(e)
    else:
        message = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    message = message if len(message) <= limit else message[:limit - 1] + "…"
    where = f" in {file}" if file is not None else ""
    return f"{type(e).__name__}{where}: {message}" if message else f"{type(e).__name__}{where}"
