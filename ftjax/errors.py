"""The one error type users see: a one-line message that names the file or tensor and says what to do."""


class FtjaxError(Exception):
    """A user-facing error. The CLI prints `ftjax: error: <message>` and exits with status 2.

    Messages are one line, name the offending file or tensor, and say what to do where that is useful.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # force one line
