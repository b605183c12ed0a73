"""One plain line for the screen, and the error boundary of every page: expected problems (bad files, mismatched
base models, missing data) are `LoLError`/`OSError` whose messages name the file, shown as one line; anything else
is a bug and is not hidden (streamlit shows it, the tests fail on it)."""
from __future__ import annotations

import logging
import traceback

__all__ = ["plain", "guard"]

log = logging.getLogger("lol.app")


def plain(e: BaseException) -> str:
    """One line: the message of a library error, or ``Type: first line`` for anything else."""
    from ..errors import LoLError

    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, OSError) and getattr(e, "filename", None) and str(e.filename) not in msg:
        msg = f"{e.filename}: {e.strerror or msg}"
    if isinstance(e, (LoLError, OSError)) and msg:
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def guard(fn, *args, what: str = "this page", **kwargs):
    """The error boundary of a page: run ``fn``; a `LoLError` or `OSError` (a bad file, a mismatched base model,
    missing data — the library's messages name the file and the problem) is shown as one plain line and the rest
    of the app keeps working. Any other exception is a bug: it propagates, so streamlit shows it and the tests
    (which fail on any exception element) catch it. Streamlit's own control flow (rerun, stop) passes through."""
    import streamlit as st

    from ..errors import LoLError

    try:
        return fn(*args, **kwargs)
    except (LoLError, OSError) as e:
        log.info("in %s: %s", what, traceback.format_exc())
        st.error(f"{what[:1].upper()}{what[1:]} could not be drawn: {plain(e)}")
        return None
