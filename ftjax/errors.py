"""The one error type users see: a one-line message that names the file or tensor and says what to do."""


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
