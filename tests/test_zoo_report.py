"""data/README.md is generated from the build's records, and says what is not built."""
import json

from lol.synth import synth_collection, tiny_spec
from lol.zoo.report import data_readme


def test_data_readme_reports_records_and_missing_parts(tmp_path):
    (tmp_path / "base" / "clip").mkdir(parents=True)
    (tmp_path / "base" / "clip" / "record.json").write_text(json.dumps(
        {"kind": "clip", "train_seconds": 12.5, "quality": {"fashion_image_to_text_top1": 0.791}}))
    synth = synth_collection(tiny_spec(), 12, ranks=(2, 4), seed=0)
    synth.write(tmp_path / "collections" / "lm")
    text = data_readme(tmp_path)
    assert "| quality.fashion_image_to_text_top1 | 0.791 |" in text
    assert "| train_seconds | 12.5 |" in text
    assert "12 LoRAs over" in text and "ranks [2, 4]" in text
    sd = text.split("`base/sd/`")[1].split("###")[0]
    assert "Not built yet" in sd
    faces = text.split("`collections/faces/`")[1].split("###")[0]
    assert "Not built yet" in faces
    # label statistics come from the collection table itself
    coll_table = synth.table
    first = next(l for l in synth.labels if synth.labels[l].get("kind") == "regression")
    assert f"| {first} | regression | {coll_table[first].astype(float).mean():.4g} |" in text


def test_data_readme_says_how_much_the_folder_holds_against_its_budget(tmp_path):
    (tmp_path / "base" / "clip").mkdir(parents=True)
    (tmp_path / "base" / "clip" / "weights.bin").write_bytes(b"\0" * 2_500_000)
    assert "In all, this folder holds 2.5 MB (budget: 300 MB; 1 MB = 10⁶ bytes throughout)." in data_readme(tmp_path)


def test_the_shipped_data_folder_stays_within_its_budget():
    """What git ships under data/ (the files a clean checkout gets; local locks and caches left out) is at most
    `DATA_BUDGET_MB` megabytes of 10⁶ bytes."""
    import subprocess
    from pathlib import Path

    import pytest

    from lol.paths import REPO
    from lol.zoo.report import DATA_BUDGET_MB

    try:
        out = subprocess.run(["git", "ls-files", "-z", "data"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: which files under data/ are shipped is unknown")
    files = [REPO / f for f in out.decode().split("\0") if f]
    if not files:
        pytest.skip("no data/ in this checkout")
    total = sum(Path(f).stat().st_size for f in files if Path(f).is_file())
    assert total <= DATA_BUDGET_MB * 1e6, f"data/ ships {total / 1e6:.1f} MB, over its {DATA_BUDGET_MB} MB budget"


def test_the_lora_effect_is_reported_overall_and_by_learning_rate():
    """identity_gain: the share of LoRAs that pull their generations toward their identity, against the goal, and the
    same per fifth of the sampled learning rates (here the low rates barely move the model, by construction)."""
    import numpy as np
    import pandas as pd

    from lol.zoo.report import _effect_lines

    lr = np.geomspace(1e-4, 1e-2, 200)
    gain = np.where(lr < 5e-4, -0.1, 0.3)                 # the lowest learning rates do nothing useful
    text = "\n".join(_effect_lines(pd.DataFrame({"lr": lr, "identity_gain": gain, "pixel_change_255": lr * 1e4})))
    share = float((gain > 0).mean())
    assert f"for {share:.1%} of 200 LoRAs (goal ≥ 90%: **not met**)" in text
    rows = [r for r in text.splitlines() if r.startswith("| 0.0")]
    assert len(rows) == 5 and all("| 40 |" in r for r in rows)
    assert rows[0].split("|")[3].strip() == "0.0%" and rows[-1].split("|")[3].strip() == "100.0%"
    # no learning rate in the table (e.g. another recipe): the overall line only
    assert "By learning rate" not in "\n".join(_effect_lines(pd.DataFrame({"identity_gain": gain})))


def test_the_reliability_table_gives_the_interval_and_the_measurements_the_goal_needs():
    """A label below the goal gets its bootstrap interval and the Spearman–Brown factor of measurements that would
    reach it; one above the goal needs no more (1.0×)."""
    import numpy as np
    import pandas as pd

    from lol.reliability import measurements_needed, retest_reliability
    from lol.zoo.report import _reliability_lines

    rng = np.random.default_rng(0)
    t = rng.normal(size=400)
    table = pd.DataFrame({"noisy": t + rng.normal(size=400), "noisy_retest": t + rng.normal(size=400),
                          "clean": t + 0.05 * rng.normal(size=400), "clean_retest": t + 0.05 * rng.normal(size=400)})
    labels = {"noisy": {"kind": "regression", "retest": "noisy_retest"},
              "clean": {"kind": "regression", "retest": "clean_retest"}}
    text = "\n".join(_reliability_lines(table, labels))
    noisy = retest_reliability(table.noisy, table.noisy_retest)
    k = measurements_needed(noisy["r"], 0.95)
    assert 15 < k < 23                                   # r ≈ 1/2: 0.95·0.5 / (0.5·0.05) = 19
    row = next(r for r in text.splitlines() if r.startswith("| noisy |"))
    lo, hi = noisy["r_ci95"]
    assert f"{noisy['r']:.3f} ({lo:.3f} – {hi:.3f})" in row and row.endswith(f"| **no** | {k:.1f}× |")
    assert next(r for r in text.splitlines() if r.startswith("| clean |")).endswith("| yes | 1.0× |")


def test_the_compute_per_phase_says_what_the_labels_cost():
    from lol.zoo.report import _phase_lines

    line = "\n".join(_phase_lines({"phase_seconds": {"train": 25.0, "sample": 75.0, "groups": 3}}))
    assert line == ("Compute per phase, over the 3 groups timed by phase (100 s): train 25% (finetuning the LoRAs), "
                    "sample 75% (generating and scoring the images that measure the labels).")
    assert _phase_lines({}) == [] and _phase_lines({"phase_seconds": {}}) == []


def test_shipped_checkpoints_are_listed_with_their_model_and_test_score(tmp_path):
    """Each label of the checkpoint index with its folder, its model (an ensemble as its weighted members) and the
    test value of the label's primary metric (and a category label's accuracy), as the checkpoint's config records
    them."""
    ck = tmp_path / "checkpoints"
    for rel, cfg in {"a/one": {"kind": "glnet", "labels": [{"name": "y", "kind": "regression"}],
                               "metrics": {"test": {"y": {"r2": 0.8123, "mae": 1.0}}}},
                     "a/two": {"kind": "ensemble", "members": [{"kind": "dense", "weight": 2},
                                                               {"kind": "svals", "weight": 1}],
                               "labels": [{"name": "b", "kind": "binary"}],
                               "metrics": {"test": {"b": {"accuracy": 0.5, "auc": 0.9}}}},
                     "a/three": {"kind": "count", "counted": {"task": "m", "kind": "colspace"},
                                 "labels": [{"name": "n", "kind": "category"}],
                                 "metrics": {"test": {"n": {"accuracy": 0.7049, "balanced_accuracy": 0.6226}}}}}.items():
        (ck / rel).mkdir(parents=True)
        (ck / rel / "config.json").write_text(json.dumps(cfg))
    (ck / "index.json").write_text(json.dumps({"y": "a/one", "b": "a/two", "n": "a/three", "gone": "a/missing"}))
    text = data_readme(tmp_path)
    assert "| y | `checkpoints/a/one` | glnet | r2 0.812 |" in text
    assert "| b | `checkpoints/a/two` | ensemble of dense×2 + svals | auc 0.900 |" in text
    assert "| n | `checkpoints/a/three` | count of m by colspace | balanced_accuracy 0.623, accuracy 0.705 |" in text
    assert "| gone | `checkpoints/a/missing` | ? | ? |" in text
