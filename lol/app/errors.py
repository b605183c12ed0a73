"""Turning failures into one plain line for the screen. A page never shows a traceback: expected problems (bad files,
mismatched base models, missing data) are LoLError/OSError with a message naming the file; anything else is shown as
its type and first line, and the full traceback goes to the server log only."""
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
    """Run ``fn``; an unexpected exception becomes an st.error line (traceback to the server log), so the rest of
    the app keeps working. Streamlit's own control flow (rerun, stop) passes through: it is not an Exception."""
    import streamlit as st

    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        log.error("error in %s:\n%s", what, traceback.format_exc())
        st.error(f"Something went wrong in {what}: {plain(e)}")
        return None
