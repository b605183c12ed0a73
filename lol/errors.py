"""Errors raised by `lol`. Every message names the file, key or shape at fault."""


class LoLError(Exception):
    """Base class for errors that `lol` reports to users as one plain line."""


class LoRAFormatError(LoLError, ValueError):
    """A LoRA file or folder cannot be read as a plain low-rank (U, V) adapter."""

    def __init__(self, path, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class SpecMismatchError(LoLError, ValueError):
    """A LoRA's modules do not match what a model or collection expects."""


class CollectionError(LoLError, ValueError):
    """A packed collection is missing, corrupt or inconsistent."""
