"""The package's own error for indexes, in a module of its own so that every layer can raise it."""

__all__ = ['HypencoderIndexError']


class HypencoderIndexError(ValueError):
    """An index that is missing, incomplete, corrupt, or does not fit the model it is used with."""
