"""Errors with one-line messages that say what is wrong and what to do.

Every error the core raises on bad input is a ``HirmError``; hosts and the CLI print
``str(error)`` as is.
"""


class HirmError(ValueError):
    """Bad input or an impossible request; the message is meant for the user."""


class PatchFileError(HirmError):
    """A file that is not a valid erasure patch."""


class PatchMismatchError(HirmError):
    """A patch that does not fit the encoder it is applied to."""


class EncoderSourceError(HirmError):
    """A text encoder that cannot be found or read."""


class TrainingError(HirmError):
    """Training stopped (non-finite values, cancelled)."""


class Cancelled(TrainingError):
    """The host asked to stop."""


class NlceError(HirmError):
    """Bad NLCE settings, concepts or a model NLCE cannot work on."""
