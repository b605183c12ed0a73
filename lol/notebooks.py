"""Run the project's notebooks with papermill, in full mode (what reproduces ``results/`` and ``data/checkpoints/``)
or in smoke mode (what the test suite runs on the zoo's CI preset).

``python -m lol.notebooks [NAME ...] [--smoke] [--out DIR] [-p KEY VALUE ...]`` executes ``notebooks/NN_*.ipynb`` in
order (later notebooks read what 02 wrote) into ``--out`` (default ``artifacts/notebooks``), leaving the committed
notebooks untouched. Parameters a notebook does not declare in its ``parameters`` cell are not passed to it.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"
KERNEL = "lol"

__all__ = ["notebooks", "declared_parameters", "register_kernel", "run_notebooks", "main"]


def notebooks() -> list[Path]:
    return sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))


def declared_parameters(nb: Path) -> set[str]:
    """Names assigned in the notebook's cell tagged ``parameters``."""
    cells = json.loads(Path(nb).read_text())["cells"]
    src = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return {line.split("=")[0].strip() for line in src.splitlines() if "=" in line and not line.startswith("#")}


def register_kernel() -> str:
    """A kernelspec named ``lol`` that runs this interpreter, under ``sys.prefix``'s share/jupyter (idempotent)."""
    d = Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python (lol)", "language": "python"}
    f = d / "kernel.json"
    if not f.is_file() or json.loads(f.read_text()) != spec:
        d.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(spec, indent=1))
    return KERNEL


def run_notebooks(out_dir, params: dict, names: list[str] | None = None, log=print) -> dict[str, Path]:
    """Execute the notebooks (all, or those whose file name starts with one of ``names``) into ``out_dir``;
    returns {notebook name: executed copy}."""
    import papermill as pm

    from .allocator import keep_freed_memory

    keep_freed_memory()  # the kernels (and their workers) start with it: freed tensors reused (`lol.allocator`)
    kernel = register_kernel()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [nb for nb in notebooks() if not names or any(nb.name.startswith(n) for n in names)]
    if not chosen:
        raise SystemExit(f"no notebook matches {names}; have {[nb.name for nb in notebooks()]}")
    executed = {}
    for nb in chosen:
        target = out / nb.name
        declared = declared_parameters(nb)
        t0 = time.perf_counter()
        pm.execute_notebook(str(nb), str(target), parameters={k: v for k, v in params.items() if k in declared},
                            kernel_name=kernel, cwd=str(NB_DIR), progress_bar=False)
        executed[nb.name] = target
        log(f"{nb.name}: {time.perf_counter() - t0:.1f} s -> {target}")
    return executed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lol.notebooks", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="notebook name prefixes, e.g. 02 05 (default: all)")
    ap.add_argument("--smoke", action="store_true", help="smoke mode (minutes; what the tests run)")
    ap.add_argument("--out", default=str(REPO / "artifacts" / "notebooks"), help="where executed copies go")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="a notebook parameter (Python literal or string), e.g. -p seeds '[0, 1, 2]'")
    a = ap.parse_args(argv)
    params: dict = {"smoke": a.smoke}
    for k, v in a.p:
        try:
            params[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            params[k] = v
    run_notebooks(a.out, params, a.names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
