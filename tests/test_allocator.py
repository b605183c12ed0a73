"""`lol.allocator.keep_freed_memory`: glibc keeps freed memory for reuse, children inherit it, the user's own
settings and the opt-out win. Each case runs in a fresh interpreter (glibc's settings are per process)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lol.allocator import SETTINGS, _glibc

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only (Linux)")

# allocate and free a 64 MB tensor 20 times; report this process's minor page faults over the loop
PROBE = """
import json, os, resource, sys
import torch
from lol.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else {}
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(16 << 20).fill_(1)
before = faults()
for _ in range(20):
    torch.empty(16 << 20).fill_(1)
env = {k: os.environ.get(k) for k in %r}
child = json.loads(__import__("subprocess").run([sys.executable, "-c", "import json, os; print(json.dumps("
                   "{k: os.environ.get(k) for k in %r}))"], capture_output=True, text=True, check=True).stdout)
print(json.dumps({"applied": applied, "faults": faults() - before, "env": env, "child": child}))
""" % (list(SETTINGS), list(SETTINGS))


def _probe(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS and k != "LOL_MALLOC"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=REPO,
                         env={**clean, **env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_tensors_are_reused_instead_of_faulting_in_fresh_pages():
    plain, kept = _probe("plain"), _probe("keep")
    assert plain["applied"] == {} and all(v is None for v in plain["env"].values())
    # 20 × 64 MB = 20 × 16,384 pages: glibc's defaults fault every one of them in again, the kept heap almost none
    assert plain["faults"] > 20 * 16384 * 0.9, plain
    assert kept["faults"] < plain["faults"] / 20, (kept["faults"], plain["faults"])
    assert kept["applied"] == {k: v for k, (_, v) in SETTINGS.items()}
    # the same settings reach child processes (workers, kernels) through glibc's own variables
    assert kept["env"] == kept["child"] == {k: str(v) for k, (_, v) in SETTINGS.items()}


def test_the_users_own_setting_and_the_opt_out_win():
    mine = _probe("keep", MALLOC_TRIM_THRESHOLD_="12345")
    assert "MALLOC_TRIM_THRESHOLD_" not in mine["applied"] and mine["env"]["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert set(mine["applied"]) == set(SETTINGS) - {"MALLOC_TRIM_THRESHOLD_"}
    off = _probe("keep", LOL_MALLOC="system")
    assert off["applied"] == {} and all(v is None for v in off["env"].values())
    assert off["faults"] > 20 * 16384 * 0.9


def test_bench_allocator_reports_the_ratio_of_medians_and_whether_the_numbers_agree():
    from argparse import Namespace

    from bench.bench_allocator import report

    def row(mode, user, sys_, values):
        return {"workload": "measure", "mode": mode, "wall_s": user + sys_, "user_s": user, "sys_s": sys_,
                "minor_faults": 1000 if mode == "defaults" else 10, "peak_mb": 800.0, "values": values}

    a = Namespace(loras=8, epochs=3, repeats=3)
    rows = [row("defaults", 40, 14, [1.5]), row("kept", 45, 0.3, [1.5]), row("defaults", 44, 14, [1.5]),
            row("kept", 44, 0.3, [1.5]), row("defaults", 50, 15, [1.5]), row("kept", 46, 0.4, [1.5])]
    text = report(rows, a)
    assert "| measure | defaults | 3 | 58.0 | 14.0 | 1,000 |" in text       # medians: 54, 58, 65 → 58
    assert "| measure | kept | 3 | 45.3 | 0.3 | 10 |" in text                # 45.3, 44.3, 46.4 → 45.3
    assert f"**{58.0 / 45.3:.2f}×**" in text and "the same numbers under both settings: yes" in text
    rows[-1]["values"] = [1.6]
    assert "the same numbers under both settings: NO" in report(rows, a)
