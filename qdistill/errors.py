"""User-facing errors.

Every problem a user can cause (a wrong config key, a bit width out of range, a foreign file)
raises :class:`QDistillError` with a one-line message that names the problem and the fix.
The CLI prints that line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class QDistillError(ValueError):
    """A problem with the user's input, explained in one line (problem, then fix)."""


class FormatError(QDistillError):
    """A number format that cannot be built or applied (bits out of range, bad group size...)."""


class ConfigError(QDistillError):
    """An unknown or invalid configuration key or value."""


class FileFormatError(QDistillError):
    """A file that is not a qdistill file, is corrupt, or comes from a newer version."""


class DataError(QDistillError):
    """A data set that is missing or malformed."""


class InputError(QDistillError):
    """A tensor a layer cannot take (wrong width, rank, dtype or device), named with the layer."""


class InputIndexError(InputError, IndexError):
    """An embedding index outside the table (an ``IndexError`` too, like ``nn.Embedding``'s)."""


class InputTypeError(InputError, TypeError):
    """An input of a kind a layer cannot take at all (a ``TypeError`` too, e.g. float indices)."""


class TrainingError(QDistillError):
    """Training that cannot go on: a non-finite loss or weights (lower the learning rate)."""
