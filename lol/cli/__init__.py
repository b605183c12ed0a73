"""The `lol` command line. Each command group lives in its own module with a ``register(subparsers)`` function.

On any error every command exits non-zero with one line on stderr that starts with ``error:`` and names the path and
the problem.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command-group modules, in the order they appear in `lol --help`
GROUPS = ("lol.cli.files", "lol.cli.models", "lol.cli.zoo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lol", description="Learning on LoRAs: inspect, pack, train and predict.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in GROUPS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a group not written yet must not break the others
            if e.name != name:
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..allocator import keep_freed_memory
    from ..errors import LoLError, one_line

    keep_freed_memory()  # freed tensors reused, not faulted in again (`lol.allocator`); workers inherit it
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (LoLError, OSError) as e:  # every OSError too (full disk, permissions, a held lock): one line
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
