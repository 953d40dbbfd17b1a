"""Exceptions the engine raises. Every message names the input, what is wrong and the fix."""


class USOError(Exception):
    """Base class: an error a user can act on (shown as-is in ComfyUI and the command line)."""


class ModelFileError(USOError):
    """A weight file is missing, unreadable, truncated, or not the kind the slot expects."""


class TokenizerNotFoundError(USOError):
    """No tokenizer files were found for a text encoder."""


class InputError(USOError):
    """A generation input (size, image, prompt, encodings) is not usable."""


class OutOfMemoryError(USOError):
    """The device ran out of memory; the message names a memory mode that would fit."""
