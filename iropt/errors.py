"""Error types that map onto the command line's exit codes.

`UserError` (exit 2) is bad input: an unreadable model, a bad schedule, an unknown pass or option.
`VerificationError` (exit 1) is a transformed model that no longer matches its reference.
`PassError` wraps an unexpected failure inside a pass and names the pass and those before it.
"""

from __future__ import annotations

from collections.abc import Sequence


class IroptError(Exception):
    """Base class of every error iropt raises on purpose."""


class UserError(IroptError):
    """Bad input from the user: the message is shown as is, with exit code 2."""

    exit_code = 2


class ModelLoadError(UserError):
    """A model file that cannot be read."""


class ModelSaveError(UserError):
    """A model that cannot be written where it was asked to go."""


class OptionError(UserError):
    """A pass option that is unknown, missing or of the wrong type."""


class UnknownPassError(UserError):
    """A pass name that is not registered."""


class VerificationError(IroptError):
    """The transformed model's outputs no longer match the reference."""

    exit_code = 1


class PassError(IroptError):
    """A pass raised; the message names the pass and the ones that ran before it."""

    exit_code = 1

    def __init__(self, pass_name: str, previous: Sequence[str], cause: BaseException) -> None:
        before = ", ".join(previous[-5:]) if previous else "none"
        if len(previous) > 5:
            before = "..., " + before
        super().__init__(
            f"pass '{pass_name}' failed: {type(cause).__name__}: {cause} (passes before it: {before})"
        )
        self.pass_name = pass_name
        self.previous = list(previous)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
