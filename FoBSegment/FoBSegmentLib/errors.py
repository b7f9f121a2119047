"""User-facing errors.

Every error a user can fix gets a ``FoBInputError`` whose message says what is wrong and
what to do; the CLI prints it as one paragraph without a traceback and the Slicer module
shows it in a dialog.  Anything else escaping the library is a bug.
"""


class FoBError(Exception):
    """Base class of every error FoBSegment raises on purpose."""


class FoBInputError(FoBError, ValueError):
    """Bad input: a file, a mask, an argument.  The message tells the user how to fix it."""


class CheckpointError(FoBError):
    """A model checkpoint is missing, corrupt or failed its checksum."""


class DownloadError(CheckpointError):
    """A checkpoint download failed (network, server, interrupted transfer)."""


class CancelledError(FoBError):
    """The user cancelled a long run; nothing was written."""

    def __init__(self, message: str = "Cancelled by the user; nothing was written."):
        super().__init__(message)
