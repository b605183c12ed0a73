"""lol.reliability: test–retest reliability is the ceiling on R², and it is measured, not assumed."""
import math

import numpy as np
import pandas as pd
import pytest

from lol.metrics import r2
from lol.reliability import label_reliability, retest_reliability, vote_ambiguity


def test_retest_reliability_recovers_the_true_share_of_variance_and_bounds_r2():
    rng = np.random.default_rng(0)
    t = rng.normal(0, 2.0, 20000)                     # what the weights determine
    y1, y2 = t + rng.normal(0, 1.0, t.size), t + rng.normal(0, 1.0, t.size)   # two independent measurements
    rel = retest_reliability(y1, y2)
    assert rel["n"] == t.size
    assert rel["r"] == pytest.approx(4 / 5, abs=0.01) and rel["r2_ceiling"] == rel["r"]
    assert rel["noise_std"] == pytest.approx(1.0, abs=0.02) and rel["label_std"] == pytest.approx(5 ** 0.5, abs=0.03)
    assert r2(y1, t) == pytest.approx(rel["r"], abs=0.01)   # the perfect model of the weights reaches the ceiling
    assert r2(y1, t + 0.5) < rel["r"]                        # anything else stays below it
    noiseless = retest_reliability(t, t + 1e-9 * rng.normal(size=t.size))
    assert noiseless["r"] > 0.999


def test_retest_reliability_drops_missing_pairs_and_refuses_mismatched_lengths():
    a = [1.0, 2.0, 3.0, np.nan, 5.0]
    b = [1.1, 1.9, 3.2, 4.0, np.nan]
    assert retest_reliability(a, b)["n"] == 3
    assert math.isnan(retest_reliability([1.0, 2.0], [1.0, 2.0])["r"])
    with pytest.raises(ValueError, match="3 first measurements but 2"):
        retest_reliability([1.0, 2.0, 3.0], [1.0, 2.0])


def test_vote_ambiguity():
    v = vote_ambiguity([0.5, 0.55, 0.6, 0.75, 1.0, 0.0, 0.4, np.nan])
    assert v["n"] == 7 and v["ambiguous"] == pytest.approx(4 / 7) and v["ties"] == pytest.approx(1 / 7)


def test_label_reliability_reads_the_schema():
    rng = np.random.default_rng(1)
    t = rng.normal(size=200)
    table = pd.DataFrame({"score": t + 0.1 * rng.normal(size=200),
                          "score_retest": np.where(np.arange(200) % 2 == 0, t + 0.1 * rng.normal(size=200), np.nan),
                          "male": rng.integers(0, 2, 200), "male_vote": rng.uniform(0, 1, 200),
                          "src": rng.integers(0, 2, 200), "other": rng.normal(size=200)})
    labels = {"score": {"kind": "regression", "retest": "score_retest"},
              "male": {"kind": "binary", "vote": "male_vote"},
              "src": {"kind": "binary", "exact": True},
              "other": {"kind": "regression"}}
    rel = label_reliability(table, labels)
    assert set(rel) == {"score", "male", "src"}           # no evidence, no claim
    assert rel["score"]["n"] == 100 and rel["score"]["r"] > 0.95
    assert rel["male"]["method"] == "vote" and 0.1 < rel["male"]["ambiguous"] < 0.3
    assert rel["src"] == {"kind": "binary", "method": "exact", "n": 200, "ambiguous": 0.0}


def test_task_ceilings_and_the_figure_that_draws_r2_against_them():
    from types import SimpleNamespace

    from lol.figures import r2_vs_ceiling
    from lol.reliability import task_ceilings

    rng = np.random.default_rng(2)
    t = rng.normal(size=300)
    coll = SimpleNamespace(
        table=pd.DataFrame({"acc": t + 0.5 * rng.normal(size=300), "acc_retest": t + 0.5 * rng.normal(size=300),
                            "loss": rng.normal(size=300), "src": rng.integers(0, 2, 300)}),
        labels={"acc": {"kind": "regression", "retest": "acc_retest"}, "loss": {"kind": "regression"},
                "src": {"kind": "binary", "exact": True}},
        tasks={"acc": ["acc"], "loss": ["loss"], "membership": ["src"]})
    ceil = task_ceilings({"lm": coll})
    assert set(ceil) == {("lm", "acc")} and ceil[("lm", "acc")]["r2_ceiling"] == pytest.approx(0.8, abs=0.06)
    summary = pd.DataFrame({"collection": "lm", "task": "acc", "model": ["glnet", "glnet", "mlp", "mlp"],
                            "gl_invariant": [True, True, False, False], "metric": ["r2", "kendall"] * 2,
                            "mean": [0.7, 0.5, 0.2, 0.1], "std": [0.02, 0.01, 0.05, 0.04]})
    fig = r2_vs_ceiling(summary, ceil)
    ax = fig.axes[0]
    assert [round(p.get_height(), 3) for p in ax.patches] == [0.2, 0.7]   # registry order: mlp first, glnet last
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(ceil[("lm", "acc")]["r2_ceiling"])


def test_spearman_brown_predicts_what_averaging_measurements_does_and_measurements_needed_inverts_it():
    from lol.reliability import measurements_needed, spearman_brown

    rng = np.random.default_rng(3)
    t = rng.normal(size=20000)
    one = retest_reliability(t + rng.normal(size=t.size), t + rng.normal(size=t.size))["r"]          # ≈ 1/2
    k = 4                                                  # averaging 4 independent measurements into one label
    avg = [t + rng.normal(size=(k, t.size)).mean(0) for _ in range(2)]
    assert retest_reliability(*avg)["r"] == pytest.approx(spearman_brown(one, k), abs=0.01)
    for r in (0.3, 0.645, 0.895):
        need = measurements_needed(r, 0.95)
        assert need > 1 and spearman_brown(r, need) == pytest.approx(0.95)
    assert measurements_needed(0.97, 0.95) == 1.0
    assert measurements_needed(-0.1, 0.95) == math.inf and math.isnan(measurements_needed(math.nan, 0.95))
    with pytest.raises(ValueError, match="goal must lie in"):
        measurements_needed(0.5, 1.0)


def test_the_bootstrap_interval_covers_the_true_reliability_and_narrows_with_more_loras():
    rng = np.random.default_rng(4)
    widths = []
    for n in (100, 1600):
        t = rng.normal(0, 2.0, n)
        y1, y2 = t + rng.normal(size=n), t + rng.normal(size=n)
        rel = retest_reliability(y1, y2)
        lo, hi = rel["r_ci95"]
        assert lo < 0.8 < hi and lo < rel["r"] < hi        # true r = 4 / 5
        widths.append(hi - lo)
        assert retest_reliability(y1, y2)["r_ci95"] == (lo, hi)                  # seeded: same data, same interval
        assert retest_reliability(y1, y2, seed=1)["r_ci95"] != (lo, hi)
    assert widths[1] < widths[0] / 2.5                     # ~1/√n: a quarter of the width at 16× the LoRAs


def test_repeated_reliability_of_an_averaged_label():
    """k independent measurements of true values t (var 1) with noise var 0.5: one measurement's reliability is
    1/1.5, their mean's the Spearman–Brown value, and the mean of k really is that reliable (its correlation with a
    fresh mean of k, on the same LoRAs). k = 2 gives `retest_reliability`'s r; rows with a gap are dropped."""
    from lol.reliability import repeated_reliability, spearman_brown

    rng = np.random.default_rng(1)
    t = rng.normal(size=4000)
    M = t[:, None] + rng.normal(size=(4000, 3)) * math.sqrt(0.5)
    fresh = (t[:, None] + rng.normal(size=(4000, 3)) * math.sqrt(0.5)).mean(1)
    rel = repeated_reliability(M)
    assert rel["n"] == 4000 and rel["k"] == 3
    assert rel["r_single"] == pytest.approx(1 / 1.5, abs=0.02)
    assert rel["r_mean"] == pytest.approx(spearman_brown(rel["r_single"], 3))
    assert rel["r_mean"] == pytest.approx(float(np.corrcoef(M.mean(1), fresh)[0, 1]), abs=0.02)
    lo, hi = rel["r_mean_ci95"]
    assert lo < spearman_brown(1 / 1.5, 3) < hi and hi - lo < 0.03
    assert rel["noise_std"] == pytest.approx(math.sqrt(0.5), rel=0.03)
    # common noises: one seed shifts every LoRA alike; that offset changes no correlation and is not noise
    shifted = repeated_reliability(M + np.array([0.0, 3.0, -2.0]))
    assert shifted["noise_std"] == pytest.approx(rel["noise_std"]) and shifted["r_mean"] == pytest.approx(rel["r_mean"])
    two = retest_reliability(M[:, 0], M[:, 1] + 3.0)
    assert repeated_reliability(np.stack([M[:, 0], M[:, 1] + 3.0], 1))["noise_std"] == pytest.approx(two["noise_std"])
    assert repeated_reliability(M[:, :2])["r_single"] == pytest.approx(retest_reliability(M[:, 0], M[:, 1])["r"])
    gappy = M.copy()
    gappy[:10, 2] = np.nan
    assert repeated_reliability(gappy)["n"] == 3990
    with pytest.raises(ValueError, match=r"expected \(LoRAs, ≥ 2 measurements\), got shape \(4000,\)"):
        repeated_reliability(M[:, 0])
    assert math.isnan(repeated_reliability(np.ones((10, 2)))["r_mean"])
