"""The one error type a user sees when a model cannot be loaded."""


class ModelLoadError(Exception):
    """A model source could not be resolved or loaded.

    The message always names the file (or hub id) and the problem, so it can be shown as is.
    """
