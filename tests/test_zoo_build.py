"""`lol zoo build` end to end on the ci preset: bases, collections, packing, build.json, resume, errors.

Select with ``-m zoo``; runs in CI (the whole file stays well under 3 minutes on 2 shared cores).
"""
import importlib.util
import json

import pytest
import torch

from lol.cli import main
from lol.collection import open_collection
from lol.zoo.build import BASE_RECIPES, COLLECTION_RECIPES, build, plan, status
from lol.zoo.jobs import ZooError
from lol.zoo.qa import SOURCES

pytestmark = pytest.mark.zoo

TOY_BASES = {**BASE_RECIPES, "toy": "lol.zoo.toy:ToyBase"}
TOY_COLS = {**COLLECTION_RECIPES, "toy": "lol.zoo.toy:ToyRecipe"}


@pytest.fixture(scope="module")
def lm_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    rc = main(["zoo", "build", "--preset", "ci", "--only", "lm", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_ci_lm_build_via_cli(lm_build, capsys):
    out = lm_build
    rec = json.loads((out / "build.json").read_text())
    assert rec["preset"] == "ci" and rec["bases"]["lm"]["status"] == "built"
    assert set(rec["bases"]) == {"lm"} and set(rec["collections"]) == {"lm"}
    assert rec["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    assert rec["collections"]["lm"]["size_bytes"] > 0 and rec["size_bytes"]["collections"] > 0
    base_rec = json.loads((out / "base" / "lm" / "record.json").read_text())
    assert base_rec["train_seconds"] > 0 and "challenge_accuracy" in base_rec
    col = open_collection(out / "collections" / "lm")
    assert len(col) == 8 and col.ids == [f"lm-{i:05d}" for i in range(8)]
    assert set(col.tasks) == {"challenge_accuracy", "eval_loss", "membership"}
    assert col.tasks["membership"] == [f"source_{s}" for s in SOURCES]
    assert col.spec.names[0] == "model.layers.0.self_attn.q_proj" and len(col.spec) == 4
    assert col.dtype == torch.float16                                         # compact storage
    assert {"group", "lr", "weight_decay", "epochs", "batch_size", "dropout"} <= set(col.table.columns)
    assert col.table["challenge_accuracy"].between(0, 1).all()
    # the packed factors are the trained ones (U = s·B, V = Aᵀ), not zeros
    assert float(col.batch([0]).U[0].abs().max()) > 0
    st = status(out)
    assert st["bases"]["lm"] and st["collections"]["lm"]["jobs_done"] == 8 and st["collections"]["lm"]["packed"]

    # a second run finds everything done: no base trained, no group run, same collection bytes
    before = (out / "collections" / "lm" / "factors.safetensors").read_bytes()
    assert main(["zoo", "build", "--preset", "ci", "--only", "lm", "--out", str(out), "--no-progress"]) == 0
    rec2 = json.loads((out / "build.json").read_text())
    assert rec2["bases"]["lm"]["status"] == "exists" and rec2["collections"]["lm"]["groups_run_now"] == 0
    assert (out / "collections" / "lm" / "factors.safetensors").read_bytes() == before
    assert main(["zoo", "status", "--out", str(out)]) == 0
    assert "8/8 LoRAs" in capsys.readouterr().out


def test_resume_after_lost_group_and_given_lm_base(lm_build, tmp_path):
    out = tmp_path / "z"
    build("ci", out, only="lm", base_paths={"lm": lm_build / "base" / "lm"}, progress=False, log=lambda *a: None)
    rec = json.loads((out / "build.json").read_text())
    assert rec["bases"]["lm"]["status"] == "linked"
    assert json.loads((out / "base" / "lm" / "record.json").read_text())["pretrained"] == \
        str((lm_build / "base" / "lm").resolve())
    a = open_collection(out / "collections" / "lm")
    ref = open_collection(lm_build / "collections" / "lm")
    assert a.table.equals(ref.table)                                           # same base, same jobs: same labels
    # a group lost from the build folder is taken back from the packed collection that holds it: nothing re-runs
    import shutil
    shutil.rmtree(out / "_build" / "lm" / "groups" / "g00000")
    build("ci", out, only="lm", base_paths={"lm": lm_build / "base" / "lm"}, progress=False, log=lambda *a: None)
    assert json.loads((out / "build.json").read_text())["collections"]["lm"]["groups_run_now"] == 0
    assert open_collection(out / "collections" / "lm").table.equals(a.table)
    # simulate a crash that lost the group before anything was packed: the re-run redoes exactly it and packs the
    # same collection
    shutil.rmtree(out / "_build" / "lm" / "groups" / "g00000")
    shutil.rmtree(out / "collections" / "lm")
    # an interrupted build can ship what it has: --pack-partial packs the finished groups only, and says so
    build("ci", out, only="lm", base_paths={"lm": lm_build / "base" / "lm"}, progress=False, log=lambda *a: None,
          pack_partial=True)
    part = open_collection(out / "collections" / "lm")
    rec = json.loads((out / "build.json").read_text())["collections"]["lm"]
    assert 0 < len(part) < len(a) and rec["complete"] is False and rec["n_planned"] == len(a)
    assert set(part.table["id"]) < set(a.table["id"]) and rec["groups_run_now"] == 0
    build("ci", out, only="lm", base_paths={"lm": lm_build / "base" / "lm"}, progress=False, log=lambda *a: None)
    rec = json.loads((out / "build.json").read_text())
    assert rec["collections"]["lm"]["groups_run_now"] == 1
    b = open_collection(out / "collections" / "lm")
    assert b.table.equals(a.table)
    assert torch.equal(b.batch().U[0], a.batch().U[0])


def test_several_collections_with_a_fake_recipe(lm_build, tmp_path):
    out = tmp_path / "z"
    import shutil
    shutil.copytree(lm_build / "base", out / "base")                          # bases present: not retrained
    rec = build("ci", out, only="toy,lm", base_recipes=TOY_BASES, collection_recipes=TOY_COLS, progress=False,
                group_size=5, log=lambda *a: None)
    assert rec["bases"]["lm"]["status"] == "exists" and rec["bases"]["toy"]["status"] == "built"
    assert rec["collections"]["toy"]["n_loras"] == 12 and rec["collections"]["toy"]["n_groups"] == 3
    assert rec["collections"]["lm"]["n_groups"] == 2
    toy = open_collection(out / "collections" / "toy")
    assert list(toy.tasks) == ["final_loss", "slope_sign"] and len(toy) == 12


def test_plan_and_errors(tmp_path, capsys):
    bases, cols = plan("lm")
    assert bases == ["lm"] and cols == ["lm"]
    bases, cols = plan("toy", TOY_BASES, TOY_COLS)
    assert bases == ["toy"] and cols == ["toy"]
    with pytest.raises(ZooError, match="unknown target"):
        plan("lm,astronomy")
    missing = {**COLLECTION_RECIPES, "faces": "lol.zoo.not_written_yet:FacesRecipe"}
    with pytest.raises(ZooError, match="collection recipe 'faces' .*not_written_yet.* not found"):
        build("ci", tmp_path, only="faces", collection_recipes=missing, progress=False, log=lambda *a: None)
    with pytest.raises(ZooError, match="unknown preset"):
        build("huge", tmp_path)
    rc = main(["zoo", "build", "--preset", "ci", "--only", "lm", "--out", str(tmp_path),
               "--lm-base", str(tmp_path / "nowhere")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and "not found" in err


@pytest.mark.skipif(importlib.util.find_spec("lol.zoo.image_recipes") is None,
                    reason="image recipes (engineer C1) not written yet")
def test_full_ci_build_all_collections(tmp_path):
    rec = build("ci", tmp_path, progress=False, log=lambda *a: None)
    assert set(rec["collections"]) == {"faces", "fashion", "fashion_v1", "lm", "lm_v2"}
    assert set(rec["bases"]) == {"sd", "sd_v1", "clip", "lm", "lm_v2"}
    # the sibling collection finetunes the sibling base (stage 1 of sd), recorded as the "sd" it generates with
    sib = open_collection(tmp_path / "collections" / "fashion_v1")
    assert json.loads(sib.meta["base_model"]) == {"sd": "base/sd_v1"}
    from lol.catalog import bases as shipped_bases, model_folder

    known = shipped_bases({n: tmp_path / "collections" / n for n in sorted(rec["collections"])})
    assert model_folder(sib, "sd", known) == tmp_path / "base" / "sd_v1"  # not the main base of the same spec
    assert known[0].models["sd"] == tmp_path / "base" / "sd"  # an upload of that spec generates on the main base
    lm_sib = open_collection(tmp_path / "collections" / "lm_v2")  # and so does the language model's sibling
    assert json.loads(lm_sib.meta["base_model"]) == {"lm": "base/lm_v2"}
    assert model_folder(lm_sib, "lm", known) == tmp_path / "base" / "lm_v2"
    for name in ("faces", "fashion", "fashion_v1", "lm", "lm_v2"):
        col = open_collection(tmp_path / "collections" / name)
        assert len(col) == rec["collections"][name]["n_loras"] > 0
    assert open_collection(tmp_path / "collections" / "faces").spec.names[0].startswith("unet.")
    # what the labels cost: the image recipes time finetuning and sampling per group, and the record sums them
    for name in ("faces", "fashion"):
        ph = rec["collections"][name]["phase_seconds"]
        assert ph["groups"] == rec["collections"][name]["n_groups"] and ph["train"] > 0 and ph["sample"] > 0
    # the build (and only the build: recipes run directly write none) leaves sample sheets of its first LoRAs
    samples = tmp_path / "samples"
    assert (samples / "faces-00000.png").is_file() and (samples / "fashion-00000.png").is_file()


def test_given_base_never_replaces_a_trained_one_nor_mixes_groups(lm_build, tmp_path):
    import shutil

    out = tmp_path / "z"
    shutil.copytree(lm_build / "base", out / "base")
    with pytest.raises(ZooError, match="trained here"):
        build("ci", out, only="lm", base_paths={"lm": lm_build / "base" / "lm"}, progress=False,
              log=lambda *a: None)
    # finished groups trained on one base are not mixed with another base's
    shutil.copytree(lm_build / "_build", out / "_build")
    rec = json.loads((out / "base" / "lm" / "record.json").read_text())
    rec["note"] = "another base"
    (out / "base" / "lm" / "record.json").write_text(json.dumps(rec))
    with pytest.raises(ZooError, match="other inputs"):
        build("ci", out, only="lm", progress=False, log=lambda *a: None)


def _toy_ids(out):
    return list(open_collection(out / "collections" / "toy").table["id"])


def test_grown_collection_adopts_what_was_packed(tmp_path, monkeypatch):
    """A collection grown by a stage (as lm grew from 400 to 2,000 LoRAs) keeps the first stage's groups; a fresh
    checkout (no build folder, only the packed collection) trains only the new stage's jobs, and the packed LoRAs come
    back bit for bit."""
    import shutil

    from lol.zoo import toy
    from lol.zoo.jobs import make_manifest

    out = tmp_path / "z"
    kw = dict(only="toy", base_recipes=TOY_BASES, collection_recipes=TOY_COLS, progress=False, log=lambda *a: None)
    monkeypatch.setitem(toy.PRESETS, "ci", dict(n=10, steps=(5, 10)))
    build("ci", out, **kw)
    first = open_collection(out / "collections" / "toy")
    first_U = [first.lora(i) for i in range(len(first))]
    first_table = first.table.copy()
    small = make_manifest(toy.ToyRecipe(), "ci", 0, 4)["groups"]
    shutil.rmtree(out / "_build")                                  # a fresh checkout: the build folder is not committed

    monkeypatch.setitem(toy.PRESETS, "ci", dict(n=18, steps=(5, 10), stages=(10,)))
    grown = make_manifest(toy.ToyRecipe(), "ci", 0, 4)["groups"]
    assert {g: grown[g] for g in small} == small                  # the first stage's groups stay as they were
    monkeypatch.setitem(toy.PRESETS, "ci", dict(n=18, steps=(5, 10)))
    assert make_manifest(toy.ToyRecipe(), "ci", 0, 4)["groups"]["g00002"] != small["g00002"]  # without stages: mixed

    monkeypatch.setitem(toy.PRESETS, "ci", dict(n=18, steps=(5, 10), stages=(10,)))
    trained = []
    run_group = toy.ToyRecipe.run_group
    monkeypatch.setattr(toy.ToyRecipe, "run_group",
                        lambda self, jobs, *a: trained.extend(j.id for j in jobs) or run_group(self, jobs, *a))
    first_s = json.loads((out / "build.json").read_text())["collections"]["toy"]["compute_seconds"]
    rec = build("ci", out, **kw)
    assert trained == [f"toy-{i:04d}" for i in range(10, 18)]     # only the new stage trains
    c = rec["collections"]["toy"]
    assert c["n_loras"] == 18 and c["complete"] and c["adopted_loras"] == 10
    # the adopted LoRAs' training time is the first build's, counted once, also when the grown build is run again
    done = [json.loads(p.read_text()) for p in (out / "_build" / "toy" / "groups").glob("*/done.json")]
    assert sum("adopted_from" in d for d in done) == 3                   # the first stage's 3 groups of ≤4
    trained_s = sum(d["seconds"] for d in done if "adopted_from" not in d)
    assert c["adopted_compute_seconds"] == first_s and c["compute_seconds"] == round(trained_s + first_s, 1)
    again = build("ci", out, **kw)["collections"]["toy"]
    assert again["compute_seconds"] == c["compute_seconds"] and again["adopted_compute_seconds"] == first_s
    big = open_collection(out / "collections" / "toy")
    assert _toy_ids(out) == [f"toy-{i:04d}" for i in range(18)]
    assert big.table.iloc[:10].equals(first_table)
    for i, lora in enumerate(first_U):
        for m, n in zip(lora, big.lora(i)):
            assert torch.equal(m.U, n.U) and torch.equal(m.V, n.V) and (m.alpha, m.scale) == (n.alpha, n.scale)


def _packed_toy_checkout(out):
    """A toy collection built and packed into ``out``, then its build folder removed (a fresh checkout): the next
    build can only adopt from the packed collection. Returns the build's keyword arguments."""
    import shutil

    kw = dict(only="toy", base_recipes=TOY_BASES, collection_recipes=TOY_COLS, progress=False, log=lambda *a: None)
    build("ci", out, **kw)
    shutil.rmtree(out / "_build")
    return kw


def test_adoption_refuses_a_collection_of_other_jobs(tmp_path, monkeypatch):
    """If the recipe changed since the collection was packed (here job 3's learning rate), its LoRAs are not the
    manifest's jobs: the build says which LoRA and setting differ instead of shipping them under the new settings."""
    from lol.zoo import toy

    out = tmp_path / "z"
    kw = _packed_toy_checkout(out)
    jobs = toy.ToyRecipe.jobs

    def changed(self, preset, seed):
        js = jobs(self, preset, seed)
        js[3].params["lr"] *= 2
        return js

    monkeypatch.setattr(toy.ToyRecipe, "jobs", changed)
    with pytest.raises(ZooError, match=r"toy-0003.*'lr'"):
        build("ci", out, **kw)


def test_adoption_refuses_a_collection_packed_before_the_recipe_gained_a_setting(tmp_path, monkeypatch):
    """A recipe that gains a setting (as fashion gained ``look``: the same draws, other finetuning images) no longer
    makes the LoRAs its packed rows hold: the row lacks the setting, so the build names the LoRA and the setting
    instead of adopting them as the new recipe's; a setting the recipe declares unrecorded is not checked."""
    from lol.zoo import toy

    out = tmp_path / "z"
    kw = _packed_toy_checkout(out)
    jobs = toy.ToyRecipe.jobs

    def gained(self, preset, seed):
        js = jobs(self, preset, seed)
        for j in js:
            j.params["look"] = "signature"
        return js

    monkeypatch.setattr(toy.ToyRecipe, "jobs", gained)
    with pytest.raises(ZooError, match=r"toy-0000.*'look': \('<not recorded>', 'signature'\)"):
        build("ci", out, **kw)
    monkeypatch.setattr(toy.ToyRecipe, "unrecorded", toy.ToyRecipe.unrecorded + ("look",))
    rec = build("ci", out, **kw)["collections"]["toy"]
    assert rec["adopted_loras"] == rec["n_loras"] > 0


def test_bench_workers_trains_the_same_loras_with_one_and_two_workers(tmp_path):
    """``bench workers`` on the toy recipe: both executors train the chosen groups, bit for bit the same LoRAs, and
    the written table states the speedup it measured (the figures themselves belong to a quiet machine)."""
    from bench.bench_workers import main
    from lol.zoo.toy import ToyBase

    ToyBase().build("ci", tmp_path / "data" / "base" / "toy", "cpu", 0)
    (tmp_path / "data" / "base" / "toy" / "record.json").write_text("{}")
    out = tmp_path / "res"
    assert main(["--collection", "lol.zoo.toy:ToyRecipe", "--preset", "ci", "--data", str(tmp_path / "data"),
                 "--groups", "2", "--group-size", "3", "--out", str(out)]) == 0
    import pandas as pd

    r = pd.read_csv(out / "bench_workers.csv").iloc[0]
    assert r["loras"] == 6 and r["groups"] == 2 and r["max_abs_diff"] == 0.0
    assert r["speedup"] == pytest.approx(r["one_worker_s"] / r["workers_s"])
    assert "bit for bit" in (out / "bench_workers.md").read_text()


@pytest.mark.parametrize("name", sorted(COLLECTION_RECIPES))
def test_default_presets_still_draw_the_shipped_loras(name):
    """Each shipped collection is adopted by the next build of its preset (a grown collection trains only its new
    stage), which needs the preset to still draw every shipped LoRA's seed and hyperparameters: a preset edited in a
    way that changes them must fail here, not after hours of a build."""
    from lol.paths import collections_root
    from lol.zoo.jobs import job_mismatch, load_object

    folder = collections_root() / name
    if not (folder / "collection.json").is_file():
        pytest.skip(f"no shipped collection {name} in {collections_root()}")
    coll = open_collection(folder)
    prov = coll.meta["provenance"]["zoo"]
    recipe = load_object(COLLECTION_RECIPES[name], name)
    jobs = {j.id: j for j in recipe.jobs(prov["preset"], prov["seed"])}
    rows = coll.table.drop(columns=[c for c in ("source", "format") if c in coll.table]).to_dict("records")
    assert len(jobs) >= len(rows)
    wrong = {r["id"]: job_mismatch(jobs[r["id"]], r, recipe.unrecorded) for r in rows
             if job_mismatch(jobs[r["id"]], r, recipe.unrecorded)}
    assert not wrong, f"{name}: the {prov['preset']} preset no longer draws these shipped LoRAs: {list(wrong.items())[:3]}"
    # and the check can fail: a LoRA's recorded learning rate differing from its job's is caught, and so is a
    # setting its row does not record (the recipe gained it since the row was written)
    r0 = dict(rows[0], lr=rows[0]["lr"] * 2) if "lr" in rows[0] else dict(rows[0], seed=rows[0]["seed"] + 1)
    assert job_mismatch(jobs[r0["id"]], r0, recipe.unrecorded)
    if "lr" in rows[0]:  # one ulp apart (numpy's exp on another CPU) is the same job; 1e-9 apart is not
        import math
        assert not job_mismatch(jobs[rows[0]["id"]], dict(rows[0], lr=math.nextafter(rows[0]["lr"], 1.0)),
                                recipe.unrecorded)
        assert job_mismatch(jobs[rows[0]["id"]], dict(rows[0], lr=rows[0]["lr"] * (1 + 1e-9)), recipe.unrecorded)
    from dataclasses import replace
    gained = replace(jobs[rows[0]["id"]], params={**jobs[rows[0]["id"]].params, "new_setting": 1})
    assert job_mismatch(gained, rows[0], recipe.unrecorded) == {"new_setting": ("<not recorded>", 1)}
