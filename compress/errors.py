"""The one exception type for problems the user can fix (bad recipe, missing file, ...).

The CLI prints its message without a traceback and exits with status 2; the Python API
lets it propagate. Messages say what is wrong *and* what to do about it.
"""


class LlmpressError(Exception):
    """A user-facing error: bad input, with a message that names the problem and the fix."""


class ShapeNotSupported(LlmpressError, ValueError):
    """A method cannot compress a layer of this shape (in_features not a multiple of its group
    size, ...). A uniform recipe reports it; a knapsack leaves that option out for the layer."""
