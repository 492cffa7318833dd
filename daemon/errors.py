"""Errors the model side raises, each with a message that names the value and the limit.

Kept in one place so the CLI (and later the daemon's server) can map them to exit codes and
error replies without knowing where they came from.
"""


class DiffucodeError(Exception):
    """Base class: anything the user can fix by changing an input."""


class CheckpointError(DiffucodeError):
    """A checkpoint directory is missing files, or a tensor has the wrong name, shape or dtype."""


class InputError(DiffucodeError):
    """A request is malformed: a cursor outside the file, a canvas over the limit, a bad option."""


class TooLarge(InputError):
    """A request is over a limit: canvas tokens, sequence length, frame size."""


class Cancelled(DiffucodeError):
    """The per-step callback cancelled a request between denoising steps."""


class QuantizationError(DiffucodeError):
    """A quantization scheme is unknown, needs a library that is missing, or does not match the
    scheme a pre-quantized checkpoint holds."""


class DaemonUnavailable(ConnectionError):
    """No daemon answers at the address: not running, failed to start, or the connection dropped.
    `listening`: something accepted the connection but the session could not begin (TCP auth)."""

    def __init__(self, message: str, *, listening: bool = False):
        super().__init__(message)
        self.listening = listening
