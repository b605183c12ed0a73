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

    threading.Timer(2.0, warmup.start).start()  # after streamlit has set up its runtime and caches
    sys.argv = ["streamlit", "run", str(REPO / "app.py"), *(sys.argv[1:] if argv is None else argv)]
    cli.main()


if __name__ == "__main__":
    main()
