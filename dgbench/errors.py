"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations


class DGBenchError(Exception):
    """Base class for errors caused by user input (config, files, data), not by a bug."""


class ConfigError(DGBenchError, KeyError):
    """A config key, value or component name is wrong."""

    def __str__(self) -> str:  # KeyError would repr() the message, adding quotes
        return str(self.args[0]) if self.args else ""


class DataError(DGBenchError):
    """A dataset is missing, incomplete or contains an unreadable file."""


def one_line(error: BaseException | str) -> str:
    """An exception's message on one line (library messages often span several)."""
    return " ".join(str(error).split()) or type(error).__name__
