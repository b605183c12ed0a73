"""lol.paper: the paper's numbers beside ours in the paper's metrics, on a small hand-made runs table."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from lol import paper as P


def _run_rows(coll, task, model, seed, split, label, kind, metrics: dict) -> list[dict]:
    return [{"collection": coll, "task": task, "model": model, "seed": seed, "split": split, "label": label,
             "label_kind": kind, "metric": m, "value": v, "gl_invariant": model != "mlp", "val_loss": 0.0}
            for m, v in metrics.items()]


def _tables():
    rows, preds = [], []
    # faces/clip_score (regression). Test r2: glnet .80/.82, dense .70/.72, mlp .90/.92 (best on test) but on
    # validation dense (.75) beats mlp (.10): "best other" is dense, chosen on validation
    r2 = {"glnet": (.80, .85), "dense": (.70, .75), "mlp": (.90, .10)}
    for model, (test, val) in r2.items():
        for seed in (0, 1):
            for split, v in (("test", test + .02 * seed), ("val", val)):
                rows += _run_rows("faces", "clip_score", model, seed, split, "clip_score", "regression",
                                  {"r2": v, "kendall": v / 2})
            # predictions: train y = 0, 2·std (population std = std); test y = 1, 1 with errors ± err
            std, err = {"glnet": (2.0, 1.0), "dense": (1.0, 1.0), "mlp": (4.0, 2.0)}[model]
            for i, (split, y, p) in enumerate([("train", 0.0, 0.0), ("train", 2 * std, 2 * std),
                                               ("val", 1.0, 1.0 + err), ("test", 1.0, 1.0 + err),
                                               ("test", 1.0, 1.0 - err)]):
                preds.append({"collection": "faces", "task": "clip_score", "model": model, "seed": seed,
                              "id": f"l{i}", "split": split, "label": "clip_score", "y": y, "pred": p})
    # faces/attributes (binary, two labels): mean per-label accuracy
    for model, (a, b) in {"glnet": (.90, .80), "dense": (.95, .85), "mlp": (.60, .70)}.items():
        for split in ("test", "val"):
            rows += _run_rows("faces", "attributes", model, 0, split, "male", "binary", {"accuracy": a, "auc": .9})
            rows += _run_rows("faces", "attributes", model, 0, split, "young", "binary", {"accuracy": b, "auc": .9})
    # fashion/n_classes (category)
    for model, acc in {"glnet": .40, "svals": .70}.items():
        for split in ("test", "val"):
            rows += _run_rows("fashion", "n_classes", model, 0, split, "n_classes", "category",
                              {"accuracy": acc, "balanced_accuracy": acc})
    return pd.DataFrame(rows), pd.DataFrame(preds)


def test_mse_on_the_normalized_target_uses_training_statistics():
    runs, preds = _tables()
    m = P.mse_norm_rows(preds, runs)
    test = m[m.split == "test"].groupby("model")["value"].mean()
    # glnet: errors ±1, train std 2 → (1/2)² = .25; dense: std 1 → 1; mlp: errors ±2, std 4 → .25
    assert test.to_dict() == pytest.approx({"glnet": 0.25, "dense": 1.0, "mlp": 0.25})
    assert set(m.split) == {"train", "val", "test"} and (m[m.split == "train"].value == 0).all()
    # a run without training rows has no statistics: left out, not guessed
    assert P.mse_norm_rows(preds[preds.split != "train"], runs).empty


def test_paper_comparison_side_by_side():
    runs, preds = _tables()
    t = P.paper_comparison(runs, preds, tasks={"dataset_size": ("fashion", "n_classes")})
    assert len(t) == len(P.PAPER)
    key = t.set_index(["paper_task", "metric"])
    r = key.loc[("CelebA-LoRA CLIP score", "r2")]
    assert (r.paper_glnet, r.paper_best_other, r.paper_best_other_model) == (.884, .871, "dense")
    assert r.ours_glnet == pytest.approx(.81) and r.ours_glnet_std == pytest.approx(.02 / math.sqrt(2))
    assert r.ours_best_other_model == "dense" and r.ours_best_other == pytest.approx(.71)  # validation chooses
    assert r.ours_best_model == "glnet" and r.glnet_place == 2 and r.n_models == 3 and r.n_seeds == 2
    assert r.why == "" and r.better == "higher"
    mse = key.loc[("CelebA-LoRA CLIP score", "mse_norm")]
    assert (mse.paper_glnet, mse.paper_best_other, mse.paper_best_other_model) == (.111, .148, "svals")
    assert mse.ours_glnet == pytest.approx(.25) and mse.better == "lower"
    # validation mse_norm of the others: dense 1, mlp .25 → mlp; on test glnet ties mlp for first place
    assert mse.ours_best_other_model == "mlp" and mse.ours_best_other == pytest.approx(.25)
    assert mse.glnet_place == 1
    acc = key.loc[("CelebA-LoRA 5 attributes: mean per-label accuracy", "accuracy")]
    assert acc.ours_glnet == pytest.approx(.85) and acc.ours_best_other == pytest.approx(.90)
    assert acc.ours_best_other_model == "dense" and acc.ours_best_model == "dense" and acc.glnet_place == 2
    assert acc.paper_glnet == .913 and acc.paper_best_other == .891
    size = key.loc[("Imagenette-LoRA dataset size (number of classes)", "accuracy")]
    assert size.ours == "fashion/n_classes" and size.ours_glnet == pytest.approx(.40)
    assert size.ours_best_other_model == "svals" and size.paper_best_other == .731
    # a paper task we did not run says so and has no numbers of ours
    lm = key.loc[("Qwen2-ARC-LoRA: ARC-C test accuracy", "r2")]
    assert lm.note == "no runs of lm/challenge_accuracy" and math.isnan(lm.ours_glnet)
    # without the mapping, the dataset-size row names the task it looked for
    t2 = P.paper_comparison(runs, preds)
    assert "no runs of fashion/dataset_size" in set(t2.note)
    # no predictions: no normalized MSE, said in the row
    t3 = P.paper_comparison(runs).set_index(["paper_task", "metric"])
    assert t3.loc[("CelebA-LoRA CLIP score", "mse_norm")].note == "no mse_norm in our runs of faces/clip_score"


def test_written_markdown_and_csv(tmp_path):
    runs, preds = _tables()
    t = P.paper_comparison(runs, preds)
    fig = pd.DataFrame({"rank": [2, 4, 8], "glnet": [.5, .4, .45]})
    csv, md = P.write_paper_comparison(t, tmp_path, figure4=fig)
    assert pd.read_csv(csv).shape == t.shape
    text = md.read_text()
    for ref in ("## Table 2", "## Table 3", "## Table 4", "## Table 5", "## Figure 4"):
        assert ref in text
    assert "| CelebA-LoRA CLIP score | faces/clip_score | r2 (higher is better) | 0.884 | 0.871 (dense) | 0.810 ± 0.014 |" \
        in text
    assert "| 4 | 0.323 | – | 0.400 |" in text and "| 1 | 0.418 | 0.424 | – |" in text


def test_bad_runs_table_is_named():
    with pytest.raises(ValueError, match=r"runs lack column\(s\) \['label_kind'"):
        P.paper_comparison(pd.DataFrame({"collection": ["c"], "task": ["t"], "model": ["m"], "seed": [0],
                                         "split": ["test"], "label": ["y"], "metric": ["r2"], "value": [1.0]}))


def test_glnet_with_an_undefined_metric_gets_no_place():
    """Regression: smoke-mode runs can leave GL-net's metric NaN (one class in a tiny split); that is no crash."""
    import math

    import pandas as pd

    from lol.paper import paper_comparison

    rows = [{"collection": "lm", "task": "challenge_accuracy", "model": m, "seed": 0, "split": sp, "label": "challenge_accuracy",
             "label_kind": "regression", "metric": "r2", "value": v, "gl_invariant": m != "mlp"}
            for m, v in (("glnet", math.nan), ("svals", 0.5), ("mlp", 0.1)) for sp in ("val", "test")]
    t = paper_comparison(pd.DataFrame(rows))
    r = t[(t.ours == "lm/challenge_accuracy") & (t.metric == "r2")]
    assert len(r) == 1 and math.isnan(r.iloc[0]["glnet_place"]) and r.iloc[0]["ours_best_other_model"] == "svals"


def _curve_rows(coll, task, kind, metric, model, values) -> list[dict]:
    """learning_curve-style tidy rows: ``values`` {fraction: [per-seed value]}."""
    return [{"collection": coll, "task": task, "model": model, "seed": s, "fraction": f, "n_train": 10,
             "label": task, "label_kind": kind, "metric": metric, "value": v}
            for f, vs in values.items() for s, v in enumerate(vs)]


def test_gaps_to_the_paper_are_explained_from_measurements(tmp_path):
    """Rows short of the paper get measured reasons (the label's test–retest ceiling, the learning curve of the model
    best at 100 %, the collection's size against the paper's); rows at or past the paper's number get none. The table
    survives writing and reading back (no "nan" cells)."""
    runs, preds = _tables()
    t = P.paper_comparison(runs, preds, tasks={"dataset_size": ("fashion", "n_classes")})
    curves = pd.DataFrame(
        _curve_rows("faces", "clip_score", "regression", "r2", "glnet", {0.5: [.60, .62], 1.0: [.80, .82]})
        + _curve_rows("faces", "clip_score", "regression", "r2", "dense", {0.5: [.50, .50], 1.0: [.70, .70]})
        + _curve_rows("faces", "clip_score", "regression", "kendall", "glnet", {0.5: [.1, .1], 1.0: [.9, .9]})
        + _curve_rows("fashion", "n_classes", "category", "balanced_accuracy", "svals",
                      {0.5: [.60, .70], 1.0: [.62, .72]})
        # a metric undefined on a test split (one class only): NaN everywhere, no curve, no error
        + _curve_rows("faces", "attributes", "binary", "auc", "dense", {0.5: [math.nan], 1.0: [math.nan]}))
    ceilings = {("faces", "clip_score"): {"r": 0.9, "n": 50}}
    out = P.explain_gaps(t, ceilings, curves, {"faces": 640, "fashion": 420}).set_index(["paper_task", "metric"])
    why = out.loc[("CelebA-LoRA CLIP score", "r2")].why             # ours .81 < the paper's .884
    assert "label reliability (test–retest r, 50 LoRAs) 0.900 caps R²" in why
    averaged = {("faces", "clip_score"): {"r": 0.93, "n": 3900, "k": 3, "method": "repeated"}}   # `zoo measure --apply`
    again = P.explain_gaps(t, averaged, curves, {"faces": 640, "fashion": 420}).set_index(["paper_task", "metric"])
    assert "label reliability (mean of 3 measurements, 3,900 LoRAs) 0.930 caps R²" in \
        again.loc[("CelebA-LoRA CLIP score", "r2")].why
    assert "learning curve (glnet, r2) 0.610 → 0.810" in why and "still rising" in why   # r2 rows only, best at 100 %
    gain = pd.DataFrame([{"collection": "faces", "task": "clip_score", "model": "glnet", "k": 3, "n_loras": 625,
                          "seeds": 3, "r2_trained_on_single": .583, "r2_trained_on_mean": .606, "gain": .023,
                          "gain_std": .015}])                    # lol.experiments.averaging_gain rows
    avg = P.explain_gaps(t, ceilings, curves, {"faces": 640}, averaged=gain).set_index(["paper_task", "metric"])
    assert ("caps R²; trained on the mean of 3 measurements instead of one (glnet, the 625 LoRAs measured 3 times, "
            "3 seeds), test R² against that mean goes 0.583 → 0.606 (+0.023 ± 0.015); learning curve"
            in avg.loc[("CelebA-LoRA CLIP score", "r2")].why)
    assert "measurements instead" not in avg.loc[("CelebA-LoRA 5 attributes: mean per-label accuracy", "accuracy")].why
    assert "640 LoRAs vs the paper's 3,900" in why
    size = out.loc[("Imagenette-LoRA dataset size (number of classes)", "accuracy")].why   # .70 < .731
    assert "(svals, balanced_accuracy) 0.650 → 0.670" in size and "within the seeds' spread" in size
    assert "caps" not in size and "420 LoRAs vs the paper's 2,046" in size
    attrs = out.loc[("CelebA-LoRA 5 attributes: mean per-label accuracy", "accuracy")].why    # .90 < .913
    assert attrs == "640 LoRAs vs the paper's 3,900"
    assert out.loc[("CelebA-LoRA CLIP score", "mse_norm")].why == why   # .25 vs the paper's .111 (lower is better)
    assert out.loc[("Qwen2-ARC-LoRA: ARC-C test accuracy", "r2")].why == ""             # no runs: nothing to explain
    search = pd.DataFrame([  # lol.experiments.best_setting rows: the chosen setting is cited, in the task's metric
        {"collection": "faces", "task": "clip_score", "model": "glnet", "metric": "r2", "setting": '{"lr": 0.003}',
         "val_mean": .84, "val_std": .01, "test_mean": .83, "test_std": .02, "chosen": True},
        {"collection": "faces", "task": "clip_score", "model": "glnet", "metric": "r2", "setting": '{"lr": 0.001}',
         "val_mean": .80, "val_std": .01, "test_mean": .85, "test_std": .02, "chosen": False}])
    with_search = P.explain_gaps(t, ceilings, curves, {"faces": 640}, search).set_index(["paper_task", "metric"])
    assert ('hyperparameter search on validation (glnet, 2 settings, r2): chosen {"lr": 0.003}, val 0.840, test 0.830'
            in with_search.loc[("CelebA-LoRA CLIP score", "r2")].why)
    assert "hyperparameter" not in with_search.loc[("CelebA-LoRA 5 attributes: mean per-label accuracy", "accuracy")].why
    # GL-net's chosen setting on notebook 02's seeds (lol.experiments.chosen_on_seeds rows): its test score in the
    # row's metric, placed among the other models' test means (ours_test: mlp .91, dense .71)
    tuned = pd.DataFrame(_run_rows("faces", "clip_score", "glnet", 0, "test", "clip_score", "regression",
                                   {"r2": .88, "kendall": .30})
                         + _run_rows("faces", "clip_score", "glnet", 1, "test", "clip_score", "regression",
                                     {"r2": .90, "kendall": .40})
                         + _run_rows("faces", "clip_score", "glnet", 1, "val", "clip_score", "regression",
                                     {"r2": .10, "kendall": .10}))           # validation rows do not count
    assert json.loads(t.set_index(["paper_task", "metric"]).loc[("CelebA-LoRA CLIP score", "r2")].ours_test) == \
        pytest.approx({"dense": .71, "glnet": .81, "mlp": .91})
    with_tuned = P.explain_gaps(t, ceilings, curves, {"faces": 640}, search, tuned=tuned).set_index(
        ["paper_task", "metric"])
    assert ('chosen {"lr": 0.003}, val 0.840, test 0.830; GL-net with that setting on seeds 0, 1: test r2 0.890 ± 0.014, '
            "which would place it 2nd of 3 (the other models keep notebook 02's setting); 640 LoRAs vs the paper's"
            in with_tuned.loc[("CelebA-LoRA CLIP score", "r2")].why)
    assert "which would place it 3rd of 3" in with_tuned.loc[("CelebA-LoRA CLIP score", "kendall")].why  # .35 < .355
    assert "with that setting" not in P.explain_gaps(t, ceilings, curves, {"faces": 640}, tuned=tuned).set_index(
        ["paper_task", "metric"]).loc[("CelebA-LoRA CLIP score", "r2")].why                  # no search cited: none
    counted = {"fashion/n_classes": pd.DataFrame([  # lol.figures.size_from_membership rows: the best is cited
        {"model": "dense", "seed": 0, "loras": 300, "accuracy": .684, "within_one": .945, "majority_baseline": .316},
        {"model": "glnet", "seed": 0, "loras": 300, "accuracy": .505, "within_one": .909, "majority_baseline": .316}])}
    with_count = P.explain_gaps(t, ceilings, curves, {"fashion": 420}, counted=counted).set_index(["paper_task", "metric"])
    size = with_count.loc[("Imagenette-LoRA dataset size (number of classes)", "accuracy")].why
    assert ("counting the classes a membership model predicts present gives the exact size for 0.684 of test LoRAs "
            "(dense; within one 0.945, always-the-commonest 0.316);" in size)        # ours (.70) does better: no claim
    counted["fashion/n_classes"].loc[0, "accuracy"] = .784
    size = P.explain_gaps(t, ceilings, curves, {"fashion": 420}, counted=counted).set_index(
        ["paper_task", "metric"]).loc[("Imagenette-LoRA dataset size (number of classes)", "accuracy")].why
    assert "exact size for 0.784 of test LoRAs (dense; within one 0.945, always-the-commonest 0.316): the weights " \
           "carry the size; the head trained on the size alone falls short of it" in size
    assert "counting" not in with_count.loc[("CelebA-LoRA CLIP score", "r2")].why
    # what ships for the size when it is a count (lol.ensemble.ship_count records): cited in the paper's accuracy
    shipped = pd.DataFrame([{"collection": "fashion", "task": "n_classes", "members": "colspace + svals",
                             "metric": "balanced_accuracy", "budget": 16.0, "shipped": True, "test_accuracy": .705,
                             "test_accuracy_std": .024, "test_within_one": .96}])
    cited = P.explain_gaps(t, ceilings, curves, {"fashion": 420}, shipped_counts=shipped).set_index(
        ["paper_task", "metric"])
    assert ("the shipped model counts the classes its membership models predict present (count of colspace + svals, "
            "chosen on validation balanced_accuracy within 16 MB): test accuracy 0.705 ± 0.024 over seeds, within one "
            "0.960" in cited.loc[("Imagenette-LoRA dataset size (number of classes)", "accuracy")].why)
    assert "shipped model counts" not in cited.loc[("CelebA-LoRA CLIP score", "r2")].why
    assert "shipped model counts" not in P.explain_gaps(
        t, ceilings, curves, {"fashion": 420}, shipped_counts=shipped.assign(shipped=False)).set_index(
        ["paper_task", "metric"]).loc[("Imagenette-LoRA dataset size (number of classes)", "accuracy")].why
    # per-label scores (lol.experiments.per_label_scores rows): the best model's label with the least gain over always
    # answering its commonest value, beside the mean over the other labels (dense is the best on validation here)
    labels = pd.DataFrame([{"collection": "faces", "task": "attributes", "model": m, "label": lab, "seeds": 1,
                            "accuracy": acc, "auc": auc, "positive_share": .3, "majority": maj, "gain": acc - maj}
                           for m, lab, acc, auc, maj in [("dense", "male", .95, .98, .60), ("dense", "young", .85, .80, .75),
                                                          ("glnet", "male", .50, .50, .60), ("glnet", "young", .50, .5, .75)]])
    weak = P.explain_gaps(t, ceilings, curves, {"faces": 640}, labels=labels).set_index(["paper_task", "metric"])
    attrs = weak.loc[("CelebA-LoRA 5 attributes: mean per-label accuracy", "accuracy")]
    assert attrs.ours_best_model == "dense" and attrs.why == (
        "weakest label young (dense): test accuracy 0.850 against 0.750 for always answering its commonest value, "
        "AUC 0.800; mean accuracy over its other 1 label 0.950; 640 LoRAs vs the paper's 3,900")
    assert "weakest" not in weak.loc[("CelebA-LoRA CLIP score", "r2")].why                 # accuracy rows only
    # a heavy-tailed label (lol.experiments.label_tail rows): cited for the row's best model (glnet on validation R²)
    # on R² and normalized MSE rows when its top share holds more than half of the variance; a light tail is not cited
    tails = pd.DataFrame([{"collection": "faces", "task": "clip_score", "model": m, "label": "clip_score", "seeds": 2,
                           "loras": 300.0, "top": 0.1, "threshold": 2.5, "variance_share": .92, "error_share": e}
                          for m, e in [("dense", .5), ("glnet", .9), ("mlp", .9)]])
    heavy = P.explain_gaps(t, ceilings, curves, {"faces": 640}, tails=tails).set_index(["paper_task", "metric"])
    text = ("heavy tail: the top 10% of test LoRAs by clip_score (from 2.500) hold 92% of its test variance and make "
            "90% of {}'s squared error, so R² mostly measures how well those few (~30 per test split) are predicted")
    r2_row, mse_row = (heavy.loc[("CelebA-LoRA CLIP score", m)] for m in ("r2", "mse_norm"))
    assert r2_row.ours_best_model == "glnet" and text.format("glnet") in r2_row.why
    assert text.format(mse_row.ours_best_model) in mse_row.why
    assert "heavy tail" not in heavy.loc[("CelebA-LoRA CLIP score", "kendall")].why       # a rank statistic: no
    light = P.explain_gaps(t, ceilings, curves, {"faces": 640}, tails=tails.assign(variance_share=.3))
    assert not light.why.str.contains("heavy tail").any()
    past = t.copy()                                                                      # ours past the paper: none
    past.loc[(past.paper_task == "CelebA-LoRA CLIP score") & (past.metric == "r2"), "ours_glnet"] = 0.95
    past = P.explain_gaps(past, ceilings, curves, {"faces": 640}).set_index(["paper_task", "metric"])
    assert past.loc[("CelebA-LoRA CLIP score", "r2")].why == ""
    # past the paper, but GL-net below second among ours (the paper has it in the top two): its own search is cited
    placed = t.copy()
    row = (placed.paper_task == "CelebA-LoRA CLIP score") & (placed.metric == "r2")
    placed.loc[row, "ours_glnet"], placed.loc[row, "glnet_place"] = 0.95, 4
    why4 = P.explain_gaps(placed, ceilings, curves, {"faces": 640}, search).set_index(
        ["paper_task", "metric"]).loc[("CelebA-LoRA CLIP score", "r2")].why
    assert why4 == ("GL-net places 4th with notebook 02's one setting; hyperparameter search on validation (glnet, 2 "
                    'settings, r2): chosen {"lr": 0.003}, val 0.840, test 0.830')
    assert P.explain_gaps(placed, ceilings, curves, {"faces": 640}, search, tuned=tuned).set_index(
        ["paper_task", "metric"]).loc[("CelebA-LoRA CLIP score", "r2")].why == (
        why4 + "; GL-net with that setting on seeds 0, 1: test r2 0.890 ± 0.014, which would place it 2nd of 3 (the "
               "other models keep notebook 02's setting)")
    assert P.explain_gaps(placed, ceilings, curves, {"faces": 640}).set_index(            # no search: nothing said
        ["paper_task", "metric"]).loc[("CelebA-LoRA CLIP score", "r2")].why == ""
    placed.loc[row, "glnet_place"] = 3
    assert P.explain_gaps(placed, ceilings, curves, {"faces": 640}, search).set_index(
        ["paper_task", "metric"]).loc[("CelebA-LoRA CLIP score", "r2")].why.startswith("GL-net places 3rd with")
    assert [P._ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22)] == ["1st", "2nd", "3rd", "4th", "11th", "12th",
                                                                         "13th", "21st", "22nd"]
    placed.loc[row, "glnet_place"] = 2
    assert P.explain_gaps(placed, ceilings, curves, {"faces": 640}, search).set_index(
        ["paper_task", "metric"]).loc[("CelebA-LoRA CLIP score", "r2")].why == ""
    csv, md = P.write_paper_comparison(out.reset_index(), tmp_path)
    back = P.read_paper_comparison(csv)
    assert list(back.why) == list(out.why) and list(back.note) == list(out.note)
    assert list(back.ours_test) == list(out.ours_test) and "" in set(back.ours_test)   # JSON kept, no "nan"
    assert "nan" not in md.read_text()


def test_our_figure4_is_the_mean_test_bce_per_evaluation_rank():
    rows = []
    for model, base in (("dense", 0.40), ("glnet", 0.30), ("svals", 0.50)):
        for seed in (0, 1):
            for rank in (1, 4, 32):
                for label, shift in (("male", 0.0), ("young", 0.02)):
                    rows.append({"collection": "faces", "task": "attributes", "model": model, "seed": seed,
                                 "train_rank": 4, "eval_rank": rank, "label": label, "metric": "bce",
                                 "value": base + shift + 0.01 * seed + (0.1 if rank != 4 else 0.0)})
                    rows.append({**rows[-1], "metric": "auc", "value": 0.9})
    fig = P.figure4_ours(pd.DataFrame(rows))
    assert list(fig.columns) == ["rank", "glnet", "dense", "svals"] and list(fig["rank"]) == [1, 4, 32]
    assert fig.set_index("rank").loc[4, "glnet"] == pytest.approx(0.30 + 0.01 + 0.005)   # labels, then seeds
    assert fig.set_index("rank").loc[32, "dense"] == pytest.approx(0.40 + 0.01 + 0.005 + 0.1)
    old = pd.DataFrame(rows)
    assert P.figure4_ours(old[old.metric != "bce"]).empty          # runs from before bce was recorded


def test_recorded_mse_norm_is_kept_and_older_runs_get_theirs_from_predictions():
    """Runs trained since the trainer records ``mse_norm`` carry it; a table spliced from older runs has it for some
    runs only: those keep what they recorded, the others get it from their predictions."""
    runs, preds = _tables()
    recorded = runs[(runs.model == "glnet") & (runs.metric == "r2")].assign(metric="mse_norm", value=0.5)
    t = P.paper_comparison(pd.concat([runs, recorded], ignore_index=True), preds).set_index(["paper_task", "metric"])
    mse = t.loc[("CelebA-LoRA CLIP score", "mse_norm")]
    assert mse.ours_glnet == pytest.approx(0.5)                           # recorded, not recomputed (.25)
    assert mse.ours_best_other_model == "mlp" and mse.ours_best_other == pytest.approx(.25)   # from predictions
    assert mse.glnet_place == 2 and mse.n_models == 3


def test_a_partial_rerun_keeps_the_reasons_of_the_tasks_it_did_not_retrain(tmp_path):
    """Notebook 02 with ``tasks``: the other tasks' measured reasons survive (read back from the written table); the
    retrained task's reason, measured on the earlier runs, is cleared for notebook 09 to measure again."""
    runs, preds = _tables()
    t = P.paper_comparison(runs, preds, tasks={"dataset_size": ("fashion", "n_classes")})
    explained = P.explain_gaps(t, {("faces", "clip_score"): {"r": 0.9, "n": 50}}, None,
                               {"faces": 640, "fashion": 420})
    csv, _ = P.write_paper_comparison(explained, tmp_path)
    rerun = P.paper_comparison(runs, preds, tasks={"dataset_size": ("fashion", "n_classes")})   # why all empty
    assert (rerun.why == "").all()
    raw = P.keep_why(rerun, P.read_paper_comparison(csv), ["faces/clip_score"])
    assert list(raw.columns) == list(rerun.columns) and len(raw) == len(rerun)
    kept = raw.set_index(["ours", "metric"])
    before = explained.set_index(["ours", "metric"])
    assert before.loc[("faces/clip_score", "r2")].why != "" and kept.loc[("faces/clip_score", "r2")].why == ""
    assert kept.loc[("faces/attributes", "accuracy")].why == before.loc[("faces/attributes", "accuracy")].why != ""
    assert kept.loc[("fashion/n_classes", "accuracy")].why == "420 LoRAs vs the paper's 2,046"
