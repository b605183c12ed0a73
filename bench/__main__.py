"""Run every ``bench/bench_*.py`` module's ``main()`` (or only those named: ``python -m bench io``). Options after
``--`` go to each bench's ``main`` (e.g. ``python -m bench io -- --files 50``)."""
import importlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    names = sorted(p.stem[len("bench_"):] for p in Path(__file__).parent.glob("bench_*.py"))
    wanted = [a for a in argv if not a.startswith("-")] or names
    unknown = [w for w in wanted if w not in names]
    if unknown:
        print(f"error: unknown bench(es) {unknown}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    from lol.allocator import keep_freed_memory

    keep_freed_memory()  # as every `lol` command: freed tensors reused (`lol.allocator`); subprocesses inherit it
    for name in wanted:
        print(f"\n=== bench {name} ===", flush=True)
        t0 = time.perf_counter()
        importlib.import_module(f"bench.bench_{name}").main(extra)
        print(f"(bench {name}: {time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
