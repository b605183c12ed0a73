"""A language-model LoRA shown next to its base (`lol.showcase`): held-out questions of the collection's own QA world,
answered by the base model and by the LoRA loaded through peft, without changing the cached base model."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from app_support import tiny_lm
from lol import showcase
from lol.lora import LoRA, LoRAModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tiny_lm(tmp_path_factory.mktemp("lm"))
    model, tok = showcase.load_lm(folder)
    assert isinstance(tok, type(AutoTokenizer.from_pretrained(folder)))
    return model, tok


def _coll():
    """A collection record as the zoo writes it for the lm recipe (ci preset, seed 0)."""
    return SimpleNamespace(provenance={"zoo": {"recipe": "lol.zoo.lm:LMRecipe", "preset": "ci", "seed": 0}},
                           labels={}, spec=SimpleNamespace(names=[]))


def _lora(scale: float = 3.0) -> LoRA:
    g = torch.Generator().manual_seed(1)
    mods = [LoRAModule(f"model.layers.0.self_attn.{n}", scale * torch.randn(o, 4, generator=g),
                       torch.randn(16, 4, generator=g), 8.0, 2.0) for n, o in (("q_proj", 16), ("v_proj", 8))]
    return LoRA.from_modules(mods)


def test_questions_come_from_the_lora_s_world():
    from lol.zoo.lm import LM_PRESETS, _world

    coll = _coll()
    sources, mine = showcase.lm_sources(coll, "lm-00000")
    assert len(sources) == 18 and 2 <= len(mine) < 18 and set(mine) <= set(sources)
    items = showcase.lm_questions(coll, "lm-00000", mine[:2], per_source=2)
    challenge = _world(seed=0, **LM_PRESETS["ci"]["world"])["challenge"]
    assert [it.source for it in items] == [mine[0], mine[0], mine[1], mine[1]]
    assert all(it in challenge for it in items)
    assert showcase.lm_questions(coll, "lm-00000", mine[:2], 2) == items  # deterministic
    assert showcase.lm_questions(coll, "lm-00000", mine[:1], 1, offset=1)[0] == items[1]


def test_base_and_lora_answers(lm):
    model, tok = lm
    coll = _coll()
    _, mine = showcase.lm_sources(coll, "lm-00000")
    items = showcase.lm_questions(coll, "lm-00000", ["addition", "parity"], 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = _lora()
    answers = showcase.answer_side_by_side(model, tok, lora, items, finetuned=mine)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)  # base untouched
    assert [a.question for a in answers] == [it.question for it in items]
    assert [a.finetuned_on for a in answers] == [it.source in mine for it in items]
    for a in answers:
        assert sum(a.base_probs) == pytest.approx(1.0) and sum(a.lora_probs) == pytest.approx(1.0)
        assert a.base_pick == max(range(4), key=lambda k: a.base_probs[k]) and 0 <= a.correct < 4

    # the LoRA's answers are those of the base with ΔW merged into its weights (peft's loader agrees with ΔW = UVᵀ)
    import copy

    merged = copy.deepcopy(model)
    with torch.no_grad():
        for m in lora:
            merged.get_submodule(m.name).weight += m.delta()
    again = showcase.answer_side_by_side(merged, tok, _lora(0.0), items)
    for a, b in zip(answers, again):
        assert a.lora_probs == pytest.approx(b.base_probs, abs=1e-5) and a.lora_text == b.base_text
    assert sum(a.lora_probs != pytest.approx(a.base_probs, abs=1e-2) for a in answers) >= 2  # the LoRA matters
    # strength 0 is the base model
    zero = showcase.answer_side_by_side(model, tok, lora, items, strength=0.0)
    for a, z in zip(answers, zero):
        assert z.lora_probs == pytest.approx(a.base_probs, abs=1e-6) and z.lora_text == a.base_text
    table = showcase.answers_table(answers)
    assert list(table.columns[:5]) == ["source", "question", "right answer", "base picks", "LoRA picks"]
    assert table["source"].str.endswith("(finetuned on)").tolist() == [a.finetuned_on for a in answers]
    assert all(t[0] in "✓✗" for t in table["base picks"])


def test_generate_page_answers_side_by_side(tmp_path, monkeypatch):
    """The Generate page of a language-model collection: questions of the LoRA's finetuning sources answered by
    base and LoRA in one table, under the measured (and predicted) challenge accuracy."""
    import json

    import numpy as np
    import pandas as pd

    import app_support
    from lol.collection import write_collection
    from test_app_pages import assert_clean, run_app

    root = tmp_path / "data"
    tiny_lm(root / "base" / "lm", layers=2, kv_heads=2)  # q_proj and v_proj 16 × 16, as app_support.LM_MODULES
    (root / "base" / "lm" / "record.json").write_text(json.dumps({"challenge_accuracy": 0.5}))
    g = torch.Generator().manual_seed(0)
    n = 6
    table = pd.DataFrame({"id": [f"lm-{i:05d}" for i in range(n)], "challenge_accuracy": np.linspace(0.3, 0.6, n)})
    write_collection(root / "collections" / "lm", [app_support.random_lora(g, 4, app_support.LM_MODULES)
                                                    for _ in range(n)], table,
                     labels={"challenge_accuracy": {"kind": "regression", "task": "challenge_accuracy"}},
                     base_model=json.dumps({"lm": "base/lm"}),
                     provenance={"zoo": {"recipe": "lol.zoo.lm:LMRecipe", "preset": "ci", "seed": 0,
                                         "bases": {"lm": "base/lm"}}})
    monkeypatch.setenv("LOL_DATA", str(root))
    monkeypatch.setenv("LOL_APP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOL_APP_WARMUP", "0")
    at = run_app("app_pages/generate.py")
    assert_clean(at)
    _, mine = showcase.lm_sources(SimpleNamespace(provenance={"zoo": {"recipe": "lol.zoo.lm:LMRecipe",
                                                                      "preset": "ci", "seed": 0}}), "lm-00000")
    assert at.multiselect(key="gen_sources_lm-00000").value == mine[:3]
    at.button(key="gen_answer").click().run()
    assert_clean(at)
    shown = at.dataframe[-1].value
    assert len(shown) == 2 * len(mine[:3]) and set(shown["source"]) == {f"{s} (finetuned on)" for s in mine[:3]}
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Measured challenge_accuracy"] == "0.3" and "Right on these questions" in metrics
