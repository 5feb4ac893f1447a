"""Typed errors: the library raises them, the CLI turns each into one line and exit code 1."""


class NkatError(Exception):
    """Any failure the user can act on (bad input, unsupported model, unwritable output)."""


class InputError(NkatError):
    """An input file or argument is missing, malformed or out of range."""


class UnsupportedModelError(NkatError):
    """The model is valid GGUF but this operation does not support it."""
