"""`lol.predict.predict_files` / `lol predict` on folder trees: every file found is a row or a skipped entry with its
reason, in the order found; the Ray executor (a local two-CPU cluster) gives the same table as the local one."""
import json
import os

import pandas as pd
import pytest
import torch

from lol.cli import main
from lol.formats import save_diffusers, save_peft
from lol.lora import LoRA
from lol.predict import find_lora_files, predict_files
from lol.synth import random_lora, synth_collection, tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lol.train import train

    d = tmp_path_factory.mktemp("pf")
    coll = synth_collection(tiny_spec(), 80, ranks=(2, 4), seed=0).write(d / "c")
    res = train(coll, ["sv_energy", "probe_positive"], "glnet", epochs=2, progress=False)
    return res.save(d / "ck")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """23 LoRAs (diffusers files and PEFT folders, ranks 2-8, nested folders) and 6 files that cannot be scored."""
    root = tmp_path_factory.mktemp("tree") / "loras"
    spec = tiny_spec()
    good = []
    for i in range(23):
        lora = random_lora(spec, (2, 4, 8)[i % 3], seed=100 + i)
        sub = root / f"group{i % 3}" / ("deep" if i % 5 == 0 else "")
        if i % 4 == 0:
            good.append(save_peft(lora, sub / f"peft{i:02d}"))
        else:
            good.append(save_diffusers(lora, sub / f"lora{i:02d}.safetensors"))
    bad = root / "group1" / "bad"
    bad.mkdir(parents=True)
    (bad / "corrupt.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    lora = random_lora(spec, 4, seed=7)
    save_diffusers(LoRA.from_modules([m for m in lora if m.name != lora.names[0]]), bad / "mismatch.safetensors")
    nan = random_lora(spec, 4, seed=8)
    nan_mod = next(iter(nan))
    nan_mod.U[0, 0] = float("nan")
    save_diffusers(nan, bad / "nan.safetensors")
    (bad / "notes.txt").write_text("hello")
    (bad / "weights.bin").write_bytes(b"pickle")
    (root / "group2" / "crash_me.safetensors").parent.mkdir(parents=True, exist_ok=True)
    save_diffusers(random_lora(spec, 4, seed=9), root / "group2" / "crash_me.safetensors")
    return root


def _accounted(res, root):
    found, not_lora = find_lora_files(root)
    every = [str(p) for p in found] + [str(p) for p, _ in not_lora]
    listed = list(res.table["path"]) + list(res.skipped["path"])
    assert sorted(listed) == sorted(every) and len(set(listed)) == len(listed)  # each file exactly once


def test_local_tree_every_file_scored_or_skipped_with_reason(ckpt, tree, tmp_path, capsys):
    res = predict_files(ckpt, tree, batch_size=8)
    _accounted(res, tree)
    assert list(res.table.columns) == ["path", "sv_energy", "probe_positive"]
    assert len(res.table) == 24 and res.table[["sv_energy", "probe_positive"]].notna().all().all()
    found, _ = find_lora_files(tree)
    order = [str(p) for p in found]
    assert list(res.table["path"]) == [p for p in order if p in set(res.table["path"])]  # found order
    why = dict(zip(res.skipped["path"].map(os.path.basename), res.skipped["reason"]))
    assert set(why) == {"corrupt.safetensors", "mismatch.safetensors", "nan.safetensors", "notes.txt", "weights.bin"}
    assert "missing" in why["mismatch.safetensors"] and "pickled" in why["weights.bin"]
    assert all(len(r) > 5 for r in why.values())
    # the same rows as predicting the files one by one in the old way (same chunks: identical numbers)
    ref = predict_files(ckpt, list(res.table["path"]), batch_size=8).table
    pd.testing.assert_frame_equal(ref, res.table)

    # the command: the table to a file, the skipped files beside it and on stderr
    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(ckpt), str(tree), "--out", str(out), "--batch-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "5 file(s) skipped" in err and "mismatch.safetensors" in err
    pd.testing.assert_frame_equal(pd.read_csv(out), res.table, check_exact=False, rtol=1e-12)
    skipped = pd.read_csv(tmp_path / "preds.skipped.csv")
    assert list(skipped.columns) == ["path", "reason"] and len(skipped) == 5
    # a folder holding nothing scoreable: every file listed with its reason (as `lol import` does), then the error
    assert main(["predict", "--checkpoint", str(ckpt), str(tree / "group1" / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "5 file(s) skipped:" and len(err) == 7
    assert err[-1].startswith("error:") and "no LoRA scored: 5 files skipped" in err[-1]


def test_ray_executor_same_table_as_local(ckpt, tree, tmp_path, capsys):
    """A local two-CPU Ray cluster: tasks of 2 chunks of 4 files; the table and the skipped list equal the local
    executor's exactly. A task whose worker dies is retried file by file; the file that kills its worker is skipped
    with the error, every other file of that task is still scored."""
    ray = pytest.importorskip("ray", reason="ray is not installed: the Ray executor cannot be tested")
    import lol.predict as P

    local = predict_files(ckpt, tree, batch_size=4)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        res = predict_files(ckpt, tree, "ray", batch_size=4, files_per_task=8)
        assert res.executor == "ray"
        pd.testing.assert_frame_equal(res.table, local.table, check_exact=True)
        pd.testing.assert_frame_equal(res.skipped, local.skipped)

        out = tmp_path / "preds.parquet"
        assert main(["predict", "--checkpoint", str(ckpt), str(tree), "--executor", "ray", "--batch-size", "4",
                     "--files-per-task", "8", "--out", str(out)]) == 0
        pd.testing.assert_frame_equal(pd.read_parquet(out), local.table, check_exact=True)
        assert "5 file(s) skipped" in capsys.readouterr().err

        original = P._ray_task

        def dies_on_crash_me(blob, chunks):  # pickled by value: runs in the workers
            if any("crash_me" in f for c in chunks for f in c):
                os._exit(1)
            return original(blob, chunks)

        P._ray_task = dies_on_crash_me
        try:
            crashed = predict_files(ckpt, tree, "ray", batch_size=4, files_per_task=8)
        finally:
            P._ray_task = original
        _accounted(crashed, tree)
        why = dict(zip(crashed.skipped["path"].map(os.path.basename), crashed.skipped["reason"]))
        assert "worker failed" in why["crash_me.safetensors"]
        keep = local.table[~local.table["path"].str.contains("crash_me")].reset_index(drop=True)
        pd.testing.assert_frame_equal(crashed.table, keep, check_exact=False, rtol=1e-5, atol=1e-6)
    finally:
        ray.shutdown()


def test_predict_json_keeps_given_paths(ckpt, tmp_path, capsys):
    spec = tiny_spec()
    a = save_peft(random_lora(spec, 4, seed=1), tmp_path / "a")
    b = save_diffusers(random_lora(spec, 8, seed=2), tmp_path / "b.safetensors")
    assert main(["predict", "--checkpoint", str(ckpt), str(b), str(a), "--json"]) == 0
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == [str(b), str(a)]
    assert torch.get_num_threads() == 1
