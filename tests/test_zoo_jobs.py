"""Resumable job manifests: deterministic groups, atomic group outputs, kill + re-run = uninterrupted build, Ray."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lol.zoo.jobs import (LocalExecutor, ZooError, collect_results, load_object, load_or_create_manifest,
                          make_manifest, pending_groups, read_group)
from lol.zoo.toy import ToyBase, ToyRecipe

torch.set_num_threads(1)


@pytest.fixture()
def toy_base(tmp_path):
    d = tmp_path / "base" / "toy"
    ToyBase().build("ci", d, "cpu", 0)
    return {"toy": d}


def run_all(build_dir, bases, recipe=None, group_size=4, max_groups=None):
    recipe = recipe or ToyRecipe()
    m = load_or_create_manifest(build_dir, recipe, "ci", 0, group_size)
    LocalExecutor(progress=False).run(recipe, build_dir, m, bases, max_groups=max_groups)
    return m


def same_results(a, b, exact=True):
    assert [r.job_id for r in a] == [r.job_id for r in b]
    for x, y in zip(a, b):
        assert x.row == y.row if exact else x.row.keys() == y.row.keys()
        for mx, my in zip(x.lora, y.lora):
            assert mx.name == my.name
            if exact:
                assert torch.equal(mx.U, my.U) and torch.equal(mx.V, my.V)
            else:
                torch.testing.assert_close(mx.U, my.U, atol=1e-6, rtol=1e-4)
                torch.testing.assert_close(mx.V, my.V, atol=1e-6, rtol=1e-4)


def test_manifest_groups_are_deterministic_and_respect_keys():
    r = ToyRecipe()
    m1, m2 = make_manifest(r, "ci", 0, 5), make_manifest(r, "ci", 0, 5)
    assert m1 == m2
    assert [len(g) for g in m1["groups"].values()] == [5, 5, 2]
    assert sum(m1["groups"].values(), []) == [j["id"] for j in m1["jobs"]]
    assert make_manifest(r, "ci", 1, 5)["jobs"] != m1["jobs"]           # another seed, other jobs

    class TwoKeys(ToyRecipe):
        def group_key(self, job):
            return int(job.id[-1]) % 2

    m = make_manifest(TwoKeys(), "ci", 0, 4)
    for ids in m["groups"].values():
        assert len({int(i[-1]) % 2 for i in ids}) == 1                     # never mixes keys
    with pytest.raises(ZooError, match="group size"):
        make_manifest(r, "ci", 0, 0)


def test_run_order_spreads_every_kind_of_group_over_the_run():
    """A build cut short holds every kind of LoRA in its share: groups of a rare key are not all left for last."""
    from lol.zoo.jobs import run_order

    class Rare(ToyRecipe):
        def group_key(self, job):
            return "rare" if job.id.endswith(("-0000", "-0001")) else "common"

    r = Rare()
    m = make_manifest(r, "ci", 0, 1)
    todo = list(m["groups"])
    order = run_order(todo, m, r)
    assert sorted(order) == sorted(todo)
    key = {g: r.group_key(m.group_jobs(g)[0]) for g in todo}
    rare = [i for i, g in enumerate(order) if key[g] == "rare"]
    assert len(rare) == 2 and rare[0] < len(order) / 2 and rare[1] >= len(order) / 2  # one in each half
    assert [g for g in order if key[g] == "common"] == [g for g in todo if key[g] == "common"]  # manifest order kept


def test_manifest_is_fixed_and_checked(tmp_path):
    r = ToyRecipe()
    m = load_or_create_manifest(tmp_path, r, "ci", 0, 4)
    again = load_or_create_manifest(tmp_path, r, "ci", 0, 7)               # other group size: groups stay fixed
    assert again["groups"] == m["groups"]
    with pytest.raises(ZooError, match="preset 'ci'"):
        load_or_create_manifest(tmp_path, r, "default", 0, 4)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ZooError, match="corrupt manifest"):
        load_or_create_manifest(tmp_path, r, "ci", 0, 4)


def test_crash_after_some_groups_then_resume_equals_uninterrupted(tmp_path, toy_base):
    ref = run_all(tmp_path / "ref", toy_base)
    ref_results = collect_results(tmp_path / "ref", ref)
    assert len(ref_results) == 12

    bd = tmp_path / "crashed"
    m = run_all(bd, toy_base, max_groups=1)                                  # "crash" after one group
    first = json.loads((bd / "groups" / "g00000" / "done.json").read_text())
    # a group killed while being written leaves a temp dir and no completion record
    stale = bd / "groups" / ".g00001.tmp-dead"
    stale.mkdir()
    (stale / "loras.safetensors").write_bytes(b"partial")
    with pytest.raises(ZooError, match="not finished"):
        collect_results(bd, m)
    assert pending_groups(bd, m) == ["g00001", "g00002"] and not stale.exists()
    summaries = LocalExecutor(progress=False).run(ToyRecipe(), bd, m, toy_base)
    assert [s["group"] for s in summaries] == ["g00001", "g00002"]         # none done twice, none lost
    assert json.loads((bd / "groups" / "g00000" / "done.json").read_text()) == first
    assert LocalExecutor(progress=False).run(ToyRecipe(), bd, m, toy_base) == []
    same_results(collect_results(bd, m), ref_results)


def test_result_does_not_depend_on_group_size(tmp_path, toy_base):
    a = collect_results(tmp_path / "a", run_all(tmp_path / "a", toy_base, group_size=12))
    b = collect_results(tmp_path / "b", run_all(tmp_path / "b", toy_base, group_size=1))
    same_results(a, b, exact=False)
    assert all(abs(x.row["final_loss"] - y.row["final_loss"]) < 1e-4 for x, y in zip(a, b))


KILL_SCRIPT = r"""
import sys, torch
torch.set_num_threads(1)
from lol.zoo.jobs import LocalExecutor, load_or_create_manifest
from lol.zoo.toy import ToyRecipe
bd, base = sys.argv[1], sys.argv[2]
r = ToyRecipe(sleep=float(sys.argv[3]))
m = load_or_create_manifest(bd, r, "ci", 0, 2)
LocalExecutor(progress=False).run(r, bd, m, {"toy": base})
"""


def test_kill_subprocess_mid_build_then_rerun(tmp_path, toy_base):
    bd = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(bd), str(toy_base["toy"]), "0.4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    gdir = bd / "groups"
    while time.time() < deadline:
        done = [p for p in gdir.glob("g*/done.json")] if gdir.is_dir() else []
        if len(done) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = load_or_create_manifest(bd, ToyRecipe(), "ci", 0, 2)
    finished_before = [g for g in m["groups"] if (gdir / g / "done.json").is_file()]
    assert 2 <= len(finished_before) < len(m["groups"]), "the kill should land mid-build"
    records = {g: (gdir / g / "done.json").read_text() for g in finished_before}
    summaries = LocalExecutor(progress=False).run(ToyRecipe(sleep=0.0), bd, m, toy_base)
    assert sorted(s["group"] for s in summaries) == sorted(set(m["groups"]) - set(finished_before))
    assert all((gdir / g / "done.json").read_text() == rec for g, rec in records.items())
    ref = run_all(tmp_path / "ref", toy_base, group_size=2)
    same_results(collect_results(bd, m), collect_results(tmp_path / "ref", ref))
    assert not [p for p in gdir.iterdir() if p.name.startswith(".")]


def test_group_files_and_errors(tmp_path, toy_base):
    m = run_all(tmp_path, toy_base, max_groups=1)
    res = read_group(tmp_path, "g00000")
    assert [r.job_id for r in res] == m["groups"]["g00000"]
    assert res[0].lora.names == ["0", "2"] and res[0].lora["0"].rank == 2
    with pytest.raises(ZooError, match="not finished"):
        read_group(tmp_path, "g00001")
    with pytest.raises(ZooError, match="module 'lol.zoo.nothing_here' not found"):
        load_object("lol.zoo.nothing_here:Recipe")
    with pytest.raises(ZooError, match="has no 'Nope'"):
        load_object("lol.zoo.toy:Nope")


def test_ray_executor_local_cluster(tmp_path, toy_base):
    ray = pytest.importorskip("ray")
    from lol.zoo.jobs import RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        r = ToyRecipe()
        m = load_or_create_manifest(tmp_path / "ray", r, "ci", 0, 4)
        out = RayExecutor(progress=False).run(r, tmp_path / "ray", m, toy_base)
        assert sorted(s["group"] for s in out) == sorted(m["groups"])
        done = json.loads((tmp_path / "ray" / "groups" / "g00000" / "done.json").read_text())
        assert done["pid"] != os.getpid()                                   # trained in a Ray worker
    finally:
        ray.shutdown()
    ref = run_all(tmp_path / "ref", toy_base)
    same_results(collect_results(tmp_path / "ray", m), collect_results(tmp_path / "ref", ref))


def test_phase_seconds_sums_each_timed_phase_once_per_group():
    """What labels cost: the image recipes record per group how long finetuning and sampling took (the same figure in
    every job of the group); a group adopted from a packed collection has no timing and is not counted."""
    from lol.zoo.jobs import phase_seconds
    from lol.zoo.recipe import JobResult

    manifest = {"groups": {"g0": ["a", "b"], "g1": ["c"], "g2": ["d", "e"], "g3": ["f"]}}
    timed = {"group_train_seconds": 10.0, "group_sample_seconds": 30.0}
    results = [JobResult("a", None, {}, extras=dict(timed)), JobResult("b", None, {}, extras=dict(timed)),
               JobResult("c", None, {}, extras={"group_train_seconds": 2.0, "group_sample_seconds": 8.0}),
               JobResult("d", None, {}, extras={}), JobResult("e", None, {}, extras={})]      # g2 adopted; g3 not done
    assert phase_seconds(results, manifest) == {"train": 12.0, "sample": 38.0, "groups": 2}
    assert phase_seconds(results[3:], manifest) == {}
