"""Errors raised by `lol`. Every message names the file, key or shape at fault; `one_line` is what a person is shown
(the CLI's ``error:`` line, the explorer's message)."""


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


def one_line(e: BaseException) -> str:
    """What a person is shown for ``e``, in one line: an `OSError` as ``PATH: problem`` (without Python's
    ``[Errno N]``), a `LoLError`'s own first line (it names the file and the problem), anything else — a bug —
    as ``Type: first line``."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    text = str(e).strip()
    msg = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    return msg if isinstance(e, (LoLError, OSError)) or not text else f"{type(e).__name__}: {msg}"
