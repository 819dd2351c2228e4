"""Error types that map onto the CLI's exit codes.

`UsageError` (and subclasses) is bad input: the CLI prints its one-line message and exits 2.
Anything else escaping a command is an internal error (exit 1).
"""

from __future__ import annotations

__all__ = ["UsageError", "ConfigError", "NotMoEError", "DataError", "AdapterError", "AdapterWarning"]


class UsageError(Exception):
    """Bad input or usage: reported as one line on stderr, exit status 2."""


class ConfigError(UsageError):
    """A bad setting; ``field`` names the setting as the library knows it (a config field or
    argument), so the command line can name its own flag instead (see :meth:`with_flag`).

    Args:
        field: the setting.
        message: what is wrong, without the setting's name.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def with_flag(self, flag: str) -> UsageError:
        """The same error naming ``flag`` (``--flag 'value': ...`` or ``--flag: ...``)."""
        return UsageError(
            f"{flag} {self.message}" if self.message.startswith("'") else f"{flag}: {self.message}"
        )


class NotMoEError(UsageError):
    """The model has no Mixture-of-Experts layers this package can drive."""


class DataError(UsageError):
    """Malformed task data (the message names the file and line)."""


class AdapterError(UsageError):
    """An adapter directory that is missing, corrupt or does not fit the base model."""


class AdapterWarning(UserWarning):
    """An adapter is accepted but could only be checked in part (the CLI prints it as one line)."""
