"""`lol import` under faults, each injected: it never lies (one success, or one ``error:`` line) and never loses data
(a half-written or unvalidated collection never appears at DEST; temporary folders of killed runs are removed)."""
import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lol.cli import main
from lol.collection import open_collection
from lol.formats import save_diffusers
from lol.paths import TEMP_MARK
from lol.synth import random_lora, tiny_spec

REPO = Path(__file__).resolve().parents[1]


def _src(tmp_path, n=6, nan_in=None):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(n):
        f = save_diffusers(random_lora(tiny_spec(), 2, seed=i), src / f"l{i}.safetensors")
        if i == nan_in:  # the header is fine; the data is not (found only when the factors are read)
            from safetensors.torch import load_file

            t = load_file(str(f))
            k = sorted(t)[0]
            t[k] = t[k].clone()
            t[k].view(-1)[0] = float("nan")
            save_file(t, str(f))
    return src


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}") and TEMP_MARK in p.name)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_held_lock_refuses_a_second_import(tmp_path, capsys):
    src, dest = _src(tmp_path), tmp_path / "c"
    fd = os.open(tmp_path / ".c.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another import at work
    try:
        assert main(["import", str(src), str(dest)]) == 2
    finally:
        os.close(fd)
    line = _one_error_line(capsys.readouterr().err)
    assert str(dest) in line and "another process is importing" in line
    assert not dest.exists() and not _leftovers(dest)
    assert main(["import", str(src), str(dest)]) == 0  # the lock ends with its holder


def test_two_concurrent_imports_one_success_one_refusal(tmp_path):
    src, dest = _src(tmp_path, n=12), tmp_path / "c"
    cmd = [sys.executable, "-m", "lol", "import", str(src), str(dest)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    res = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    ok = [r for r in res if r[0] == 0]
    bad = [r for r in res if r[0] != 0]
    assert len(ok) == 1 and len(bad) == 1, res
    assert "packed 12 LoRAs" in ok[0][1]
    line = _one_error_line(bad[0][2])
    assert str(dest) in line and ("another process is importing" in line or "already exists" in line), line
    open_collection(dest).verify()
    assert len(open_collection(dest)) == 12 and not _leftovers(dest)


def test_nan_file_is_dropped_before_anything_is_committed(tmp_path, capsys):
    src, dest = _src(tmp_path, nan_in=2), tmp_path / "c"
    # a kill inside the re-pack (the window that used to leave NaN files as all-zero LoRAs at DEST)
    code = ("import os, sys, lol.collection as C, lol.cli.files\n"
            "real = C.write_collection\n"
            "calls = []\n"
            "def wc(*a, **k):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 2: os._exit(9)\n"
            "    return real(*a, **k)\n"
            "C.write_collection = wc\n"
            "from lol.cli import main\n"
            f"sys.exit(main(['import', {str(src)!r}, {str(dest)!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr
    assert not dest.exists()  # nothing committed: no collection holding the NaN file as a zero LoRA
    assert _leftovers(dest)   # the killed run's staging folder ...
    assert main(["import", str(src), str(dest)]) == 0  # ... is removed by the next run, which succeeds
    err = capsys.readouterr().err
    assert "l2.safetensors" in err and "NaN/Inf" in err
    c = open_collection(dest)
    assert len(c) == 5 and "l2.safetensors" not in set(c.table["id"]) and not _leftovers(dest)


def test_full_disk_is_one_error_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    src, dest = _src(tmp_path), tmp_path / "c"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert main(["import", str(src), str(dest)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no space" in line and str(tmp_path) in line
    assert not dest.exists() and not _leftovers(dest)


def test_any_oserror_is_one_error_line(tmp_path, capsys, monkeypatch):
    import pandas as pd

    src, dest = _src(tmp_path), tmp_path / "c"

    def broken(self, path, *a, **k):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    assert main(["import", str(src), str(dest)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "Input/output error" in line and "loras.parquet" in line
    assert not dest.exists() and not _leftovers(dest)


def test_every_file_not_imported_is_listed(tmp_path, capsys):
    src, dest = _src(tmp_path, n=3), tmp_path / "c"
    torch.save({"x": torch.ones(2)}, src / "loose.bin")
    (src / "sub").mkdir()
    torch.save({"x": torch.ones(2)}, src / "sub" / "model.pt")
    (src / "notes.txt").write_text("hello")
    (src / "dangling.safetensors").symlink_to(tmp_path / "nowhere")
    assert main(["import", str(src), str(dest)]) == 0
    err = capsys.readouterr().err
    for name, why in (("loose.bin", "pickled .bin"), ("sub/model.pt", "pickled .pt"), ("notes.txt", "not a LoRA"),
                      ("dangling.safetensors", "broken symbolic link")):
        assert any(name in ln and why in ln for ln in err.splitlines()), (name, err)
    assert len(open_collection(dest)) == 3


def test_stale_temp_folders_are_removed_on_start(tmp_path, capsys):
    src, dest = _src(tmp_path, n=2), tmp_path / "c"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = tmp_path / f".c{TEMP_MARK}stage-{dead}-deadbeef"
    stale.mkdir()
    (stale / "factors.safetensors").write_bytes(b"\0" * 4096)
    assert main(["import", str(src), str(dest)]) == 0
    assert not stale.exists() and not _leftovers(dest) and json.loads((dest / "collection.json").read_text())["n"] == 2
