"""User-facing errors.

Anything raised as `LiverstageError` is a problem with the user's input (a file, an option, a
model); the CLI prints its message as one line on stderr and exits non-zero, without a traceback.
Keep messages to one line and name the offending file or value.
"""


class LiverstageError(Exception):
    """A problem the user can fix; its message is shown as one line."""

    exit_code = 2


class InputError(LiverstageError):
    """A bad input file or option (missing, corrupt, wrong shape, wrong kind)."""


class ModelError(LiverstageError):
    """A model file that is not ours, corrupt, or built for another machine."""


class BackendUnavailable(LiverstageError):
    """An inference/export backend (GPU, TensorRT, onnxruntime) is not present here."""
