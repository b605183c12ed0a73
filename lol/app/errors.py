"""The error boundary of every page: expected problems (bad files, mismatched base models, missing data) are
`LoLError`/`OSError` whose messages name the file, shown as one line (`lol.errors.one_line`); anything else is a bug
and is not hidden (streamlit shows it, the tests fail on it)."""
from __future__ import annotations

import logging
import traceback

from ..errors import LoLError, one_line

__all__ = ["guard"]

log = logging.getLogger("lol.app")


def guard(fn, *args, what: str = "this page", **kwargs):
    """The error boundary of a page: run ``fn``; a `LoLError` or `OSError` (a bad file, a mismatched base model,
    missing data — the library's messages name the file and the problem) is shown as one plain line and the rest
    of the app keeps working. Any other exception is a bug: it propagates, so streamlit shows it and the tests
    (which fail on any exception element) catch it. Streamlit's own control flow (rerun, stop) passes through."""
    import streamlit as st

    try:
        return fn(*args, **kwargs)
    except (LoLError, OSError) as e:
        log.info("in %s: %s", what, traceback.format_exc())
        st.error(f"{what[:1].upper()}{what[1:]} could not be drawn: {one_line(e)}")
        return None
