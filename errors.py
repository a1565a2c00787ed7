"""Exceptions, split by whose fault it is.

``UserInputError`` (and its subclasses) means the input from outside was wrong: a file,
an argument, an HTTP body, a checkpoint. The CLI prints its message as one line and
exits non-zero; servers return it as a 4xx. ``ModelBehaviourError`` means the model
produced something unexpected (e.g. an output that does not parse). Anything else is a
bug in omnivox.
"""


class OmnivoxError(Exception):
    """Base class of omnivox's own exceptions."""


class UserInputError(OmnivoxError, ValueError):
    """Input from outside is invalid; the message says which input and what is wrong."""


class AudioInputError(UserInputError):
    """An audio file or array cannot be used (missing, corrupt, empty, non-finite, too long...)."""


class CheckpointError(UserInputError):
    """A checkpoint or model folder is missing, malformed, or does not match the expected layout."""


class ModelBehaviourError(OmnivoxError):
    """The model produced output that the caller cannot use."""
