"""First-visit time of every page of the explorer, per shipped collection, under streamlit's AppTest (the app's
own script run, without a browser): ``python scripts/first_visits.py [--warm] [--collections lm,fashion]``.

Each page is visited once in a fresh browser session of one server process, as a visitor who picks the collection
in the sidebar and then opens the page: the time is that page's first run. ``--warm`` first runs the server's
warm-up (`lol.app.warmup`) to the end, as `scripts/serve.py` starts it when the server comes up; without it every
cache starts empty (the worst case: a visit before the warm-up got there). Prints one line per page: wall-clock
seconds, and the CPU seconds of this process (the wall time an unloaded machine would show for single-threaded work,
so a measurement on a busy machine still means something)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = ("collection", "predict", "embeddings", "generate", "membership", "language_models", "models")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warm", action="store_true", help="run the server's warm-up to the end first")
    ap.add_argument("--collections", default=None, help="comma list (default: every shipped collection)")
    ap.add_argument("--pages", default=",".join(PAGES))
    args = ap.parse_args()
    os.environ["LOL_APP_WARMUP"] = "0"  # the warm-up is run here, synchronously, when asked
    sys.path.insert(0, str(REPO))
    from streamlit.testing.v1 import AppTest

    from lol.paths import shipped_collections

    names = args.collections.split(",") if args.collections else list(shipped_collections())
    if args.warm:
        from lol.app import warmup

        t = time.perf_counter()
        warmup._warm()
        print(f"warm-up: {time.perf_counter() - t:.1f} s {warmup.timings()}", flush=True)
    rows = []
    for name in names:
        for page in args.pages.split(","):
            at = AppTest.from_file(str(REPO / "app.py"), default_timeout=600)
            at.query_params["collection"] = name
            t, c = time.perf_counter(), time.process_time()
            at.run()  # the landing page (Collection) of a fresh session, opened on this collection
            if not rows:  # the process's very first run: a visitor before any cache is filled
                print(f"first run of the server (Collection page, {name}): wall {time.perf_counter() - t:.2f} s  "
                      f"cpu {time.process_time() - c:.2f} s", flush=True)
            t, c = time.perf_counter(), time.process_time()
            at.switch_page(f"app_pages/{page}.py")
            at.run()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            bad = [str(e.value)[:80] for e in at.exception] + [str(e.value)[:80] for e in at.error]
            rows.append((name, page, dt, dc))
            print(f"{name:8s} {page:16s} wall {dt:6.2f} s  cpu {dc:6.2f} s{'  ' + '; '.join(bad) if bad else ''}",
                  flush=True)
    worst = max(rows, key=lambda r: r[3]) if rows else None
    if worst:
        print(f"slowest first visit (cpu): {worst[0]} {worst[1]} {worst[3]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
