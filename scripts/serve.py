"""The explorer's server, as `make app` runs it: ``python scripts/serve.py [streamlit options]``.

It is ``streamlit run app.py`` in this process, plus `lol.app.warmup` started as soon as streamlit's runtime accepts
sessions — before anyone visits — so the first visit of every page finds its caches filled. Nothing from ``lol`` is
imported before the server is up (``import lol`` loads torch: seconds that would delay the server's start)."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _warm_when_up(poll: float = 0.25) -> None:
    from streamlit.runtime import Runtime
    from streamlit.runtime.runtime import RuntimeState

    while not (Runtime.exists() and Runtime.instance().state in (RuntimeState.NO_SESSIONS_CONNECTED,
                                                                  RuntimeState.ONE_OR_MORE_SESSIONS_CONNECTED)):
        time.sleep(poll)
    sys.path.insert(0, str(REPO))
    from lol.allocator import keep_freed_memory
    from lol.app import warmup

    keep_freed_memory()  # before the app computes anything: freed tensors reused (`lol.allocator`)

    warmup.start()


def main() -> None:
    from streamlit.web import cli

    threading.Thread(target=_warm_when_up, name="lol-app-serve", daemon=True).start()
    sys.argv = ["streamlit", "run", str(REPO / "app.py"), *sys.argv[1:]]
    cli.main()


if __name__ == "__main__":
    main()
