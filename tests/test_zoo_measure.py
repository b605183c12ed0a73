"""Measuring a packed collection's label again (`lol.zoo.measure`): the build's protocol reproduced from the packed
LoRAs, resumable files, and the reliability of the averaged measurements."""
import json

import numpy as np
import pandas as pd
import pytest
from zoo_image_support import ci_bases, shipped_retested

from lol.collection import open_collection
from lol.errors import CollectionError, LoLError
from lol.zoo.build import _pack
from lol.zoo.image_recipes import FacesRecipe
from lol.zoo.measure import (_read, _write, label_protocol, measure, measured_reliability, measurement_chunks,
                             measurement_path, measurements)
from lol.zoo.report import _main_rows_measured, _measurement_lines

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Three rank-4 ci faces LoRAs, finetuned and labelled by the recipe, packed as the build packs them."""
    bases = ci_bases()
    r = FacesRecipe()
    jobs = [j for j in r.jobs("ci", 0) if j.params["rank"] == 4][:3]
    results = r.run_group(jobs, bases, "cpu")
    out = tmp_path_factory.mktemp("zoo")
    dest = _pack("faces", r, results, out, bases, {"recipe": "lol.zoo.image_recipes:FacesRecipe", "n_jobs": 3,
                                                    "group_size": 3}, "ci", 0)
    return dest, jobs, results


def test_measuring_is_resumable_and_keeps_what_it_measured(packed):
    """A limited run stops, a rerun measures only the rest, and what was measured is kept as it was."""
    dest, jobs, _ = packed
    coll = open_collection(dest)
    seed = label_protocol(coll)["retest_seed"]
    lines = []
    path = measure(dest, seed, limit=1, chunk=2, progress=lines.append)
    assert path == measurement_path(dest, "clip_score", seed) and len(pd.read_parquet(path)) == 1
    first = pd.read_parquet(path).iloc[0].copy()
    measure(dest, seed, chunk=2, progress=lines.append)
    df, meta = _read(path)
    assert list(df["id"]) == [j.id for j in jobs] and df.iloc[0]["value"] == first["value"]
    assert meta["seed"] == seed and meta["factors"] == list(coll.factors_hash)
    assert lines[-1].startswith(f"{path.name}: 3/3 LoRAs")
    measure(dest, seed, progress=lines.append)          # nothing left: measures nothing, says so
    assert lines[-1].endswith("all 3 LoRAs measured")


def test_chunks_follow_table_order_so_parallel_seeds_overlap_from_the_start():
    """Chunks hold one rank each and are cut in table order, whatever order the ranks come in: two runs (two seeds)
    interrupted after the same number of chunks measured the same LoRAs, and the first chunk is the first LoRAs of
    the rank that fills a chunk first. Session 13's two runs, which took the ranks in different orders, overlapped on
    9 LoRAs of over 200."""
    ranks = [8, 4, 8, 4, 16, 4, 8, 4, 1]
    todo = list(range(len(ranks)))
    chunks = measurement_chunks(ranks, todo, 2)
    assert chunks == [[0, 2], [1, 3], [5, 7], [4], [6], [8]]
    assert sorted(i for c in chunks for i in c) == todo                     # every LoRA once
    assert all(len({ranks[i] for i in c}) == 1 for c in chunks)               # one rank per chunk
    # a resumed run (the first two chunks done) continues in the same order
    rest = [i for i in todo if i not in (0, 2, 1, 3)]
    assert measurement_chunks([ranks[i] for i in rest], rest, 2) == [[5, 7], [4], [6], [8]]
    with pytest.raises(ValueError, match="chunk"):
        measurement_chunks(ranks, todo, 0)


def test_the_retest_seed_reproduces_the_shipped_builds_second_measurement(tmp_path):
    """Two shipped faces LoRAs that the build measured twice, packed again from their fp16 factors and measured with
    the build's retest seed, get the build's own retest values: same protocol, same noises, same LoRAs. (The ci
    bases score every image 0, so this needs the shipped ones.) On common noises LoRAs without effect would all
    score alike: the two differ."""
    rows, bases = shipped_retested(tmp_path / "two")
    path = measure(tmp_path / "two", label_protocol(open_collection(tmp_path / "two"))["retest_seed"],
                              bases=bases)
    got = pd.read_parquet(path)["value"].to_numpy()
    want = rows["clip_score_retest"].to_numpy(float)
    np.testing.assert_allclose(got, want, atol=0.05)
    assert abs(want[0] - want[1]) > 1.0, want


@pytest.mark.parametrize("collection,label,atol", [("faces", "identity_gain", 0.002), ("fashion", "class_gain", 0.002)])
def test_the_gains_measured_again_reproduce_the_shipped_builds_retest(tmp_path, collection, label, atol):
    """identity_gain (faces) and class_gain (fashion) compare a LoRA's generations with its finetuning images, which
    the build's jobs name: measured again from the packed fp16 LoRAs with the build's retest seed, two shipped LoRAs
    get the build's own retest values (to 0.0004 and 3e-5 when written; the tolerance is far below the two LoRAs'
    difference, which the test also checks)."""
    rows, bases = shipped_retested(tmp_path / "two", collection, label)
    coll = open_collection(tmp_path / "two")
    path = measure(tmp_path / "two", label_protocol(coll, label)["retest_seed"], label, bases=bases)
    assert path == measurement_path(tmp_path / "two", label, label_protocol(coll, label)["retest_seed"])
    got = pd.read_parquet(path)["value"].to_numpy()
    want = rows[f"{label}_retest"].to_numpy(float)
    np.testing.assert_allclose(got, want, atol=atol)
    assert abs(want[0] - want[1]) > 20 * atol, want


def test_a_gain_is_measured_only_against_the_lora_its_build_finetuned(tmp_path):
    """A row whose recorded identity is not its build job's would be compared with another identity's images: refused,
    naming the LoRA, before any image is generated. A label of another recipe is refused too."""
    from lol.collection import TABLE_NAME

    rows, bases = shipped_retested(tmp_path / "two", "faces", "identity_gain")
    t = pd.read_parquet(tmp_path / "two" / TABLE_NAME)
    t.loc[0, "identity"] = int(t.loc[0, "identity"]) + 1
    t.to_parquet(tmp_path / "two" / TABLE_NAME, index=False)
    with pytest.raises(CollectionError, match=f"LoRA '{rows['id'][0]}' differs from its build's job identity"):
        measure(tmp_path / "two", 7, "identity_gain", bases=bases)
    assert not measurement_path(tmp_path / "two", "identity_gain", 7).exists()
    with pytest.raises(LoLError, match="'class_gain' is measured for collections built by .*FashionRecipe"):
        measure(tmp_path / "two", 7, "class_gain", bases=bases)
    with pytest.raises(LoLError, match="cannot be measured again; measurable labels"):
        label_protocol(open_collection(tmp_path / "two"), "smiling")
    # a fashion LoRA whose recorded classes are not its job's
    rows, bases = shipped_retested(tmp_path / "fashion", "fashion", "class_gain")
    t = pd.read_parquet(tmp_path / "fashion" / TABLE_NAME)
    t.loc[0, "class_bag"] = 1 - int(t.loc[0, "class_bag"])
    t.to_parquet(tmp_path / "fashion" / TABLE_NAME, index=False)
    with pytest.raises(CollectionError, match=f"LoRA '{rows['id'][0]}' differs from its build's job class_bag"):
        measure(tmp_path / "fashion", 7, "class_gain", bases=bases)


def test_measurements_and_their_reliability_and_the_report(packed, tmp_path):
    dest, _, _ = packed
    coll = open_collection(dest)
    seed = label_protocol(coll)["retest_seed"]
    measure(dest, seed)
    values, sources = measurements(coll)
    assert list(values.columns) == ["build", f"seed {seed}"] and len(values) == 3
    np.testing.assert_allclose(values["build"], coll.table["clip_score"].astype(float))
    assert [s["n"] for s in sources] == [3, 3] and sources[1]["seconds"] > 0 and sources[1]["cpu_seconds"] > 0
    rel = measured_reliability(coll)
    assert rel["k"] == 2 and rel["n"] == 3
    text = "\n".join(_measurement_lines(coll))
    assert "`clip_score` measured again" in text and f"seed {seed}: 3 LoRAs" in text
    assert f"their mean's {rel['r_mean']:.3f}" in text
    assert f"seed {seed}: 3 LoRAs, {sources[1]['cpu_seconds']:.1f} CPU-s per LoRA" in text
    assert "too few LoRAs to judge (fewer than 100)" in text          # 3 LoRAs say nothing against the goal
    assert "Every LoRA has every measurement: `lol zoo measure --apply` averages them." in text
    # a file measured on other LoRAs (another factors hash) is refused by name, never mixed in
    df, meta = _read(measurement_path(dest, "clip_score", seed))
    other = measurement_path(dest, "clip_score", 7)
    _write(other, df, {**meta, "seed": 7, "factors": ["blake3", "0" * 64]})
    try:
        with pytest.raises(CollectionError, match="clip_score-seed7.parquet: measured with another protocol or other"):
            measurements(coll)
        with pytest.raises(CollectionError, match="seed7.parquet: measured with another protocol"):
            measure(dest, 7)
    finally:
        other.unlink()


def test_refusals_name_the_problem(packed, tmp_path):
    dest, _, _ = packed
    with pytest.raises(LoLError, match="seed 42 is the build's own"):
        measure(dest, 42)
    from lol.synth import synth_collection, tiny_spec

    synth_collection(tiny_spec(), 4, ranks=(2,), seed=0).write(tmp_path / "synth")
    with pytest.raises(CollectionError, match="no zoo provenance"):
        label_protocol(open_collection(tmp_path / "synth"))
    bad = measurement_path(tmp_path, "clip_score", 5)
    bad.parent.mkdir(parents=True)
    bad.write_text("not parquet")
    with pytest.raises(CollectionError, match="seed5.parquet: not a readable measurement file"):
        _read(bad)
    pd.DataFrame({"id": ["a"], "value": [1.0]}).to_parquet(bad)
    with pytest.raises(CollectionError, match="not a lol measurement file"):
        _read(bad)
    assert json.loads(json.dumps(label_protocol(open_collection(dest))))["images"] >= 1


def test_a_second_run_of_one_seed_is_refused_while_the_first_measures(packed, capfd):
    """Two runs of one seed would append the same LoRAs to one file side by side (it happened when a killed run's
    workers lived on): while one run holds the file's lock, another is refused by name and changes nothing; once the
    lock is released the same command measures."""
    from lol.cli import main
    from lol.paths import exclusive_lock

    dest, _, _ = packed
    path = measurement_path(dest, "clip_score", 8042)
    with exclusive_lock(path, "measuring"):                      # the first run, holding the file
        with pytest.raises(BlockingIOError, match="another process is measuring it now") as e:
            measure(dest, 8042, limit=1)
        assert e.value.filename == str(path) and not path.exists()
        assert main(["zoo", "measure", "--out", str(dest.parent.parent), "--collection", "faces", "--seed", "8042",
                     "--limit", "1"]) != 0
        err = capfd.readouterr().err
        assert "another process is measuring it now" in err and path.name in err and not path.exists()
    assert len(pd.read_parquet(measure(dest, 8042, limit=1))) == 1    # the lock ended with its holder
    path.unlink()


def test_the_cli_measures_and_refuses_with_a_clear_error(packed, capfd):
    """(capfd: the per-seed workers print to the inherited file descriptors)"""
    from lol.cli import main

    dest, _, _ = packed
    out = dest.parent.parent
    assert main(["zoo", "measure", "--out", str(out), "--collection", "faces", "--seed", "5042", "--limit", "2",
                 "--main-rows"]) == 0                              # one rank: every LoRA is a main row
    path = measurement_path(dest, "clip_score", 5042)
    assert f"wrote {path}" in capfd.readouterr().out and len(pd.read_parquet(path)) == 2
    path.unlink()
    assert main(["zoo", "measure", "--out", str(out), "--collection", "faces", "--seed", "42"]) != 0
    assert "seed 42 is the build's own" in capfd.readouterr().err
    assert main(["zoo", "measure", "--out", str(out), "--collection", "faces"]) != 0
    assert "give --seed S" in capfd.readouterr().err
    assert main(["zoo", "measure", "--out", str(out), "--collection", "faces", "--label", "class_gain", "--seed",
                 "5042"]) != 0
    assert "'class_gain' is measured for collections built by" in capfd.readouterr().err
    # several seeds in one command: one worker process each, the same values as measuring each seed here
    assert main(["zoo", "measure", "--out", str(out), "--collection", "faces", "--seed", "6042", "7042", "--limit",
                 "1"]) == 0
    printed = capfd.readouterr().out
    for s in (6042, 7042):
        path = measurement_path(dest, "clip_score", s)
        assert f"wrote {path}" in printed and f"{path.name}: 1/3 LoRAs" in printed
        side_by_side = pd.read_parquet(path)
        path.unlink()
        here = pd.read_parquet(measure(dest, s, limit=1))
        assert list(side_by_side["id"]) == list(here["id"]) and np.allclose(side_by_side["value"], here["value"])
        path.unlink()
    assert main(["zoo", "measure", "--out", str(out), "--collection", "faces", "--seed", "6042", "42"]) != 0
    assert "seed 42 is the build's own" in capfd.readouterr().err    # refused before either seed measures
    assert not measurement_path(dest, "clip_score", 6042).exists()


def test_apply_makes_the_label_the_mean_of_complete_measurements(packed, tmp_path):
    """Only once every LoRA has every measurement; the table keeps each one as its own column, the label becomes their
    mean, the schema lists them (so label_reliability gives the mean's reliability), the fingerprint changes, and a
    second apply changes nothing."""
    import shutil

    from lol.reliability import label_reliability
    from lol.zoo.measure import apply_measurements

    dest = tmp_path / "faces"
    shutil.copytree(packed[0], dest)
    shutil.rmtree(dest / "measurements", ignore_errors=True)
    coll = open_collection(dest)
    with pytest.raises(LoLError, match="no measurement beyond the build's"):
        apply_measurements(dest)
    ids = coll.table["id"].astype(str).tolist()
    from lol.zoo.measure import lora_measurements

    assert lora_measurements(coll, "clip_score", ids[0]) is None                 # measured by the build alone
    meta = {"label": "clip_score", "protocol": {k: v for k, v in label_protocol(coll).items()
                                                if k not in ("seed", "retest_seed")},
            "factors": list(coll.factors_hash)}
    # the ci scorer gives every image 0, so measurements with values of their own stand in for two more seeds
    _write(measurement_path(dest, "clip_score", 7), pd.DataFrame({"id": ids[:2], "value": [10.0, 20.0],
                                                                  "seconds": [1.0, 1.0], "cpu_seconds": [3600.0] * 2}),
           {**meta, "seed": 7})
    with pytest.raises(LoLError, match="seed 7: 1 LoRAs missing"):
        apply_measurements(dest)
    from lol.zoo.report import _measurement_lines

    assert ("Left before `--apply` can average them: 1 LoRAs (seed 7), about 1.0 CPU-hours at the measured cost"
            in "\n".join(_measurement_lines(open_collection(dest))))
    # the cost is the latest rows' (older ones may predate a speed-up): 300 slow rows, then RECENT fast ones
    from lol.zoo import measure as measure_module

    n_old, fast = 300, measure_module.RECENT
    costs = pd.DataFrame({"id": [f"x{i}" for i in range(n_old + fast)], "value": 1.0,
                          "seconds": [10.0] * n_old + [5.0] * fast, "cpu_seconds": [10.0] * n_old + [5.0] * fast})
    _write(measurement_path(dest, "clip_score", 7), pd.concat([pd.DataFrame({"id": ids[:2], "value": [10.0, 20.0],
                                                                             "seconds": 10.0, "cpu_seconds": 10.0}),
                                                               costs]), {**meta, "seed": 7})
    _, sources = measurements(open_collection(dest))
    assert sources[1]["cpu_seconds"] == 5.0 and sources[1]["seconds"] == 5.0
    _write(measurement_path(dest, "clip_score", 7), pd.DataFrame({"id": ids, "value": [10.0, 20.0, 30.0],
                                                                  "seconds": [1.0] * 3}), {**meta, "seed": 7})
    _write(measurement_path(dest, "clip_score", 9), pd.DataFrame({"id": ids[::-1], "value": [3.0, 2.0, 1.0],
                                                                  "seconds": [1.0] * 3}), {**meta, "seed": 9})
    # one LoRA's measurements, each centred by its seed's offset: the mean difference from the build's over the LoRAs
    mine = lora_measurements(coll, "clip_score", ids[1])
    build1 = float(coll.table["clip_score"].iloc[1])
    assert list(mine.source) == ["build", "seed 7", "seed 9"]
    np.testing.assert_allclose(mine.value, [build1, 20.0, 2.0])
    off7 = np.mean([10.0, 20.0, 30.0] - coll.table["clip_score"].to_numpy(float))
    off9 = np.mean([1.0, 2.0, 3.0] - coll.table["clip_score"].to_numpy(float))     # seed 9's file, matched by id
    np.testing.assert_allclose(mine.centred, [build1, 20.0 - off7, 2.0 - off9])
    with pytest.raises(CollectionError, match="no LoRA 'nope'"):
        lora_measurements(coll, "clip_score", "nope")
    before, build = coll.fingerprint, coll.table["clip_score"].to_numpy(float)
    apply_measurements(dest)
    after = open_collection(dest)
    t = after.table
    assert after.fingerprint != before and len(after) == 3
    assert after.labels["clip_score"]["measurements"] == ["clip_score_seed42", "clip_score_seed7", "clip_score_seed9"]
    np.testing.assert_allclose(t["clip_score_seed42"], build)
    np.testing.assert_allclose(t["clip_score_seed9"], [1.0, 2.0, 3.0])          # matched by id, not by position
    np.testing.assert_allclose(t["clip_score"], (build + np.array([10, 20, 30]) + np.array([1, 2, 3])) / 3)
    assert "mean of 3 independent measurements (noise seeds 42, 7, 9" in after.labels["clip_score"]["description"]
    rel = label_reliability(t, after.labels)["clip_score"]
    assert rel["method"] == "repeated" and rel["k"] == 3 and rel["n"] == 3
    assert "The `clip_score` column is their mean" in "\n".join(_measurement_lines(after))
    apply_measurements(dest)                                                    # again: the same label
    np.testing.assert_allclose(open_collection(dest).table["clip_score"], t["clip_score"])


def test_the_reliability_of_a_mean_label_reaches_the_report_the_ceilings_and_the_app():
    import math

    from lol.app.views import ceiling_text
    from lol.reliability import label_reliability, repeated_reliability, task_ceilings
    from lol.zoo.report import _reliability_lines

    rng = np.random.default_rng(0)
    tr = rng.normal(size=500)
    M = tr[:, None] + rng.normal(size=(500, 3)) * 0.6
    table = pd.DataFrame({"y": M.mean(1), "y_s1": M[:, 0], "y_s2": M[:, 1], "y_s3": M[:, 2],
                          "y_retest": tr + rng.normal(size=500)})
    labels = {"y": {"kind": "regression", "task": "y", "measurements": ["y_s1", "y_s2", "y_s3"], "retest": "y_retest"}}
    rel = label_reliability(table, labels)["y"]
    want = repeated_reliability(M)
    assert rel["method"] == "repeated" and rel["r"] == pytest.approx(want["r_mean"]) and rel["k"] == 3
    assert rel["r2_ceiling"] == pytest.approx(want["r_mean"]) and math.isfinite(rel["r_ci95"][0])
    row = next(r for r in _reliability_lines(table, labels) if r.startswith("| y |"))
    assert row.startswith(f"| y | 500 (3 times; the label is their mean) | {want['r_mean']:.3f} (")

    class Coll:
        tasks = {"y": ["y"]}

    Coll.table, Coll.labels = table, labels
    once = {"z": {"kind": "regression", "task": "z"}}                       # measured once, nothing more
    assert ("No reliability evidence in this collection for `z`: its build measured each LoRA once (no retest column) "
            "and nothing was measured again." in _reliability_lines(table.assign(z=tr), once))
    assert task_ceilings({"c": Coll})[("c", "y")]["r"] == pytest.approx(want["r_mean"])
    text = ceiling_text("y", rel)
    assert f"**{want['r_mean']:.3f}**" in text and "the mean of 3 independent measurements of each of 500 LoRAs" in text


def test_main_rows_are_measured_first_when_asked(packed, tmp_path):
    """``main_rows=True`` measures only the LoRAs the tasks train on (the most common rank), says so when they are
    done, and a later run without it measures the rest into the same file."""
    from dataclasses import replace

    from lol.collection import write_collection
    from lol.lora import LoRA

    dest, _, _ = packed
    coll = open_collection(dest)
    low = coll.lora(2)                                    # the third LoRA cut to rank 2: a minority rank
    low = LoRA.from_modules([replace(m, U=m.U[:, :2].clone(), V=m.V[:, :2].clone()) for m in low.modules.values()],
                            format=low.format, metadata=low.metadata, source=low.source)
    rows = coll.table.assign(rank=[4, 4, 2])
    mixed = tmp_path / "mixed"
    write_collection(mixed, [coll.lora(0), coll.lora(1), low], rows, labels=coll.labels, tasks=coll.tasks,
                     base_model=coll.meta.get("base_model"), provenance=coll.meta["provenance"])
    seed, lines = 7, []
    path = measure(mixed, seed, bases=ci_bases(), main_rows=True, progress=lines.append)
    assert list(pd.read_parquet(path)["id"]) == list(rows["id"][:2])
    measure(mixed, seed, bases=ci_bases(), main_rows=True, progress=lines.append)
    assert lines[-1].endswith("every main-row LoRA measured (2 of 3 LoRAs)")
    text = "\n".join(_measurement_lines(open_collection(mixed)))
    assert "Of the 2 LoRAs the tasks train on (rank 4), 2 have every measurement" in text
    measure(mixed, seed, bases=ci_bases(), progress=lines.append)
    assert list(pd.read_parquet(path)["id"]) == list(rows["id"])
    assert _main_rows_measured(coll, "clip_score") == ""                  # one rank: every LoRA is a main row
