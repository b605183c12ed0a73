"""The LM zoo: QA world (sources, exact answers, splits, determinism), byte tokenizer, LMBase and LMRecipe."""
import json

import numpy as np
import pytest
import torch

from lol.zoo import qa
from lol.zoo.qa import LEVELS, SOURCES, byte_tokenizer, make_item, make_split, make_world, prompt_text

torch.set_num_threads(1)


def _solve(it):
    """An independent solver for every source, from the question text alone."""
    q = it.question
    nums = [int(x) for x in __import__("re").findall(r"\d+", q)]
    quoted = __import__("re").findall(r"'([a-z]+)'", q)
    s = it.source
    if s == "addition":
        return nums[0] + nums[1]
    if s == "subtraction":
        return nums[0] - nums[1]
    if s == "multiplication":
        return nums[0] * nums[1]
    if s == "comparison" or s == "max_of_list":
        return max(nums)
    if s == "min_of_list":
        return min(nums)
    if s == "parity":
        return "even" if nums[0] % 2 == 0 else "odd"
    if s == "count_letter":
        return quoted[1].count(quoted[0])
    if s == "word_length":
        return len(quoted[0])
    if s == "reverse_word":
        return quoted[0][::-1]
    if s in ("next_letter", "previous_letter"):
        k, ch = nums[0], quoted[0]
        return chr(ord(ch) + (k if s == "next_letter" else -k))
    if s == "sort_digits":
        return "".join(sorted(str(q.split()[-1])))
    if s == "copy":
        return quoted[0]
    if s == "alphabetical_first":
        return min(q.split(": ")[1].rstrip("?").split(", "))
    if s == "last_letter":
        return quoted[0][-1]
    if s == "digit_sum":
        return sum(int(d) for d in str(nums[0]))
    if s == "count_vowels":
        return sum(c in "aeiou" for c in quoted[0])
    raise AssertionError(s)


def test_world_has_many_sources_with_exact_answers():
    assert len(SOURCES) >= 12
    rng = np.random.default_rng(0)
    for src in SOURCES:
        for level in LEVELS:
            for _ in range(30):
                it = make_item(src, level, rng)
                assert len(set(it.choices)) == 4 and it.answer in "ABCD"
                assert it.answer_text == str(_solve(it)), (src, level, it)
                assert set(prompt_text(it) + " " + it.answer_text) <= set(qa.CHARSET)


def test_challenge_is_harder_and_splits_are_deterministic_and_disjoint():
    w1, w2 = make_world(3, 6, 2, 4, 3), make_world(3, 6, 2, 4, 3)
    assert w1 == w2
    assert make_world(4, 6, 2, 4, 3)["test"] != w1["test"]
    assert {it.level for it in w1["challenge"]} == {"challenge"}
    assert {it.level for it in w1["test"]} == {"standard"}
    assert {it.level for it in w1["train"]} == {"standard", "challenge"}
    assert len(w1["train"]) == 6 * len(SOURCES)
    mean_len = {lv: np.mean([len(it.question) for it in make_split(20, lv, 0)]) for lv in LEVELS}
    assert mean_len["challenge"] > mean_len["standard"]
    # sources with large question spaces never repeat a test/challenge question in train
    big = {"addition", "reverse_word", "copy", "sort_digits", "max_of_list", "count_vowels"}
    held = {it.question for it in w1["test"] + w1["challenge"] + w1["eval"]}
    assert not [it for it in w1["train"] if it.source in big and it.question in held]
    with pytest.raises(KeyError, match="unknown QA source"):
        make_item("astronomy", "standard", np.random.default_rng(0))


def test_retest_splits_are_the_same_size_and_disjoint_from_every_other_split():
    w = make_world(3, 6, 4, 4, 5, n_retest=1)
    assert "challenge_retest" not in make_world(3, 6, 4, 4, 5) and make_world(3, 6, 4, 4, 5)["test"] == w["test"]
    assert len(w["challenge_retest"]) == len(w["challenge"]) and len(w["eval_retest"]) == len(w["eval"])
    assert {it.level for it in w["challenge_retest"]} == {"challenge"}
    big = {"addition", "reverse_word", "copy", "sort_digits", "max_of_list", "count_vowels"}
    for a in ("challenge_retest", "eval_retest"):
        others = {it.question for k in w if k != a for it in w[k] if it.source in big}
        assert not [it for it in w[a] if it.source in big and it.question in others], a


def test_byte_tokenizer_round_trips_and_loads_next_to_a_qwen2_config(tmp_path):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = byte_tokenizer()
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    text = "Q: what is 'abc' reversed?\nA: cba"
    ids = back(text, add_special_tokens=False)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"] and len(ids) == len(text)
    assert back.decode(ids) == text and back.eos_token_id == 0 and back.pad_token_id == 1


@pytest.fixture(scope="module")
def ci_base(tmp_path_factory):
    from lol.zoo.lm import LMBase

    out = tmp_path_factory.mktemp("lm") / "base" / "lm"
    rec = LMBase().build("ci", out, "cpu", 0)
    return out, rec


def test_lm_base_build_record_and_reload(ci_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lol.zoo.lm import LMBase, LM_PRESETS, _world, evaluate

    out, rec = ci_base
    assert LMBase().is_built(out) and json.loads((out / "record.json").read_text()) == json.loads(json.dumps(rec))
    assert rec["architecture"] == "Qwen2ForCausalLM" and rec["train_seconds"] > 0
    assert set(rec["test_accuracy_per_source"]) == set(SOURCES)
    assert rec["pretrain"]["loss_last"] < rec["pretrain"]["loss_first"]          # it learned something
    # the saved folder reloads to the same model: same figures from from_pretrained
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    w = _world(seed=0, **LM_PRESETS["ci"]["world"])
    ev = evaluate(model, tok, w["eval"], w["test"])
    assert float(ev["eval_loss"][0]) == pytest.approx(rec["eval_loss"], rel=1e-5)
    assert float(ev["correct"].float().mean()) == pytest.approx(rec["test_accuracy"])


def test_lm_recipe_jobs_labels_and_group_training(ci_base):
    from lol.zoo.lm import LMRecipe

    out, _ = ci_base
    r = LMRecipe()
    jobs = r.jobs("ci", 0)
    assert jobs == r.jobs("ci", 0) and len(jobs) == 8
    for j in jobs:
        assert len(j.params["sources"]) >= 2 and set(j.params["sources"]) | set(j.params["dropped"]) == set(SOURCES)
        assert 0 <= j.params["dropout"] <= 0.1 and j.params["epochs"] in (2, 3, 4)
    schema = r.label_schema()
    assert schema["challenge_accuracy"]["kind"] == "regression"
    assert {k for k, v in schema.items() if v["task"] == "membership"} == {f"source_{s}" for s in SOURCES}
    assert schema["challenge_accuracy"]["retest"] == "challenge_accuracy_retest"
    assert schema["eval_loss"]["retest"] == "eval_loss_retest"
    assert all(schema[f"source_{s}"]["exact"] for s in SOURCES)
    flagged = [j for j in jobs if j.params["retest"]]
    assert flagged and len(flagged) < len(jobs) and len({r.group_key(j) for j in jobs}) == 2
    rt = r.run_group(flagged[:2], {"lm": out}, "cpu")  # measured twice, on disjoint question and eval sets
    for x in rt:
        assert 0 <= x.row["challenge_accuracy_retest"] <= 1 and x.row["eval_loss_retest"] > 0
    jobs = [j for j in jobs if not j.params["retest"]]
    res = r.run_group(jobs[:3], {"lm": out}, "cpu")
    for j, x in zip(jobs[:3], res):
        assert x.job_id == j.id
        assert x.lora.names[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
        assert all(m.rank == 4 and m.scale == 2.0 for m in x.lora)
        assert all(x.row[f"source_{s}"] == int(s in j.params["sources"]) for s in SOURCES)
        assert 0 <= x.row["challenge_accuracy"] <= 1 and x.row["eval_loss"] > 0
        assert np.isnan(x.row["challenge_accuracy_retest"]) and np.isnan(x.row["eval_loss_retest"])  # not retested
        assert max(float(m.U.abs().max()) for m in x.lora) > 0                 # B moved off its zero init
    # a job's result does not depend on its group: job 1 trained alone equals job 1 trained with 0 and 2
    alone = r.run_group([jobs[1]], {"lm": out}, "cpu")[0]
    for a, b in zip(alone.lora, res[1].lora):
        torch.testing.assert_close(a.U, b.U, atol=2e-5, rtol=1e-3)
        torch.testing.assert_close(a.V, b.V, atol=2e-5, rtol=1e-3)
    assert alone.row["eval_loss"] == pytest.approx(res[1].row["eval_loss"], rel=1e-4)


def test_lm_sibling_base_continues_the_base(ci_base, tmp_path):
    """base/lm_v2 is base/lm pretrained further (as SD-1.5 continues SD-1.4): same architecture and module shapes,
    other weights, the same QA world; it refuses to start without its parent."""
    import shutil

    from transformers import AutoModelForCausalLM

    from lol.zoo.lm import LMSiblingBase

    src, parent = ci_base
    with pytest.raises(FileNotFoundError, match="build 'lm' first"):
        LMSiblingBase().build("ci", tmp_path / "alone" / "lm_v2", "cpu", 0)
    shutil.copytree(src, tmp_path / "base" / "lm")
    rec = LMSiblingBase().build("ci", tmp_path / "base" / "lm_v2", "cpu", 0)
    assert LMSiblingBase().is_built(tmp_path / "base" / "lm_v2")
    assert rec["stage"] == 2 and rec["parent"] == "base/lm" and rec["world"] == parent["world"]
    assert rec["config"] == parent["config"] and rec["pretrain"]["pool_stream"] == 1
    a = AutoModelForCausalLM.from_pretrained(src).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "base" / "lm_v2").state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-3            # trained further: other weights


def test_lm_sibling_recipe_same_distribution_other_draws():
    """lm_v2's jobs follow lm's recipe (sources, hyperparameter ranges, world) with their own draws and ids, no job
    repeats one of lm's, none is measured twice, and its labels carry no retest."""
    from lol.zoo.lm import LMRecipe, LMSiblingRecipe

    main_jobs, sib = LMRecipe().jobs("ci", 0), LMSiblingRecipe()
    jobs = sib.jobs("ci", 0)
    assert len(jobs) == 4 and all(j.id.startswith("lm_v2-") for j in jobs) and sib.requires == ("lm_v2",)
    assert {j.params["world"]["seed"] for j in jobs} == {0} and jobs[0].params["world"] == main_jobs[0].params["world"]
    drawn = lambda j: (tuple(j.params["sources"]), j.params["lr"], j.params["batch_size"])  # noqa: E731
    assert not {drawn(j) for j in jobs} & {drawn(j) for j in main_jobs}
    assert not any(j.params["retest"] for j in jobs)
    schema = sib.label_schema()
    assert set(schema) == set(LMRecipe().label_schema())
    assert not any("retest" in v or "retest" in v["description"] for v in schema.values())


def test_lm_base_links_a_given_folder(ci_base, tmp_path):
    from lol.zoo.image_bases import resolve_base
    from lol.zoo.lm import LMBase

    src, _ = ci_base
    rec = LMBase(pretrained=src).build("ci", tmp_path / "lm", None, 0)
    assert rec["pretrained"] == str(src.resolve()) and resolve_base(tmp_path / "lm") == src.resolve()
