"""``python -m lol.app.serve [streamlit options]``: the explorer's server (what `make app` runs). It is
``streamlit run app.py`` in this process, with `lol.app.warmup` started a moment after the server is up, before
anyone visits — so the first visit of every page finds its caches filled."""
from __future__ import annotations

import sys
import threading

from .data import REPO


def main(argv: list[str] | None = None) -> None:
    from streamlit.web import cli

    from . import warmup

    threading.Thread(target=_warm_when_up, args=(warmup.start,), name="lol-app-serve", daemon=True).start()
    sys.argv = ["streamlit", "run", str(REPO / "app.py"), *(sys.argv[1:] if argv is None else argv)]
    cli.main()


def _warm_when_up(start, poll: float = 0.25) -> None:
    """Start the warm-up once streamlit's runtime accepts sessions, so it never slows the server's start."""
    import time

    from streamlit.runtime import Runtime
    from streamlit.runtime.runtime import RuntimeState

    while not (Runtime.exists() and Runtime.instance().state in (RuntimeState.NO_SESSIONS_CONNECTED,
                                                                  RuntimeState.ONE_OR_MORE_SESSIONS_CONNECTED)):
        time.sleep(poll)
    start()


if __name__ == "__main__":
    main()
