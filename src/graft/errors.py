"""The exceptions graft raises.

Every message names the file or option at fault, says what was expected and how to fix it.
The CLI prints them without a traceback; from Python they are ordinary exceptions.
"""

from __future__ import annotations


class GraftError(Exception):
    """Base class of every error graft raises on purpose."""


class ConfigError(GraftError, ValueError):
    """An option has a value graft cannot use (unknown name, out of range, incompatible).

    `parameter` names the Python parameter at fault (`lr`, `max_upload_bytes`) when there is one;
    the message then reads "lr: expected ...", and the CLI shows the flag that sets it instead.
    """

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        self.message = message
        self.parameter = parameter
        super().__init__(f"{parameter}: {message}" if parameter else message)

    def __reduce__(self) -> tuple:  # pickled (worker processes) with its parameter, not only its text
        return (_config_error, (self.message, self.parameter))


def _config_error(message: str, parameter: str | None) -> ConfigError:
    return ConfigError(message, parameter=parameter)


class DataError(GraftError):
    """The images or labels given cannot be used as they are."""


class ImageError(DataError):
    """One image file cannot be read as an image."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageTooLargeError(ImageError):
    """An image declares more pixels than a limit allows (refused before any pixel is decoded)."""


class BackboneError(GraftError):
    """A backbone or its weights cannot be created or found."""


class BundleError(GraftError):
    """A saved bundle is missing, incomplete, damaged (graft.json unlike its schema or its weights), or newer than graft."""


class TrainingError(GraftError):
    """Training cannot go on: the loss or the weights stopped being finite numbers (it diverged)."""


class OutputError(GraftError, OSError):
    """A file or folder graft should write cannot be: a file in the way, no permission, disk full,
    or a folder that holds what graft did not write (graft never deletes that). An `OSError` too,
    so code that tolerates a failed write (an optional cache file) keeps doing so."""
