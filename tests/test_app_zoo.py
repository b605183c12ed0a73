"""The explorer on real zoo output: `lol zoo build --preset ci` (real SD / CLIP / LM bases and the faces, fashion and
lm collections, the session's `ci_zoo` fixture), plus small models trained on them with `lol.train`. Every page, for
every collection, renders without an exception or error; Generate runs the real pipeline."""
from __future__ import annotations

import json

import pytest

from test_app_pages import assert_clean, run_app, widget


PAGES = ("collection", "predict", "embeddings", "generate", "membership", "language_models", "models")


@pytest.fixture(scope="module")
def zoo(ci_zoo, tmp_path_factory):
    root = ci_zoo
    ckpts = tmp_path_factory.mktemp("cizoo_models")
    from lol.collection import open_collection
    from lol.train import TrainConfig, train

    cfg = TrainConfig(epochs=3, width=8, batch_size=8, patience=3, progress=False, device="cpu",
                      fractions=(0.5, 0.25, 0.25))
    index = {}
    for name, labels in (("faces", ["clip_score", "male"]), ("lm", ["challenge_accuracy", "eval_loss"])):
        c = open_collection(root / "collections" / name)
        train(c, labels, "glnet", cfg).save(ckpts / name / "glnet")  # rank-agnostic: zoo ranks are mixed
        index[labels[0]] = f"{name}/glnet"
    (ckpts / "index.json").write_text(json.dumps(index))
    return root, ckpts


def test_every_page_on_the_ci_zoo(zoo, monkeypatch, tmp_path):
    root, ckpts = zoo
    data = tmp_path / "data"  # the zoo output plus the trained checkpoints, laid out as the app expects
    data.mkdir()
    for part in ("base", "collections"):
        (data / part).symlink_to(root / part)
    (data / "checkpoints").symlink_to(ckpts)
    monkeypatch.setenv("LOL_DATA", str(data))
    monkeypatch.setenv("LOL_APP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOL_APP_WARMUP", "0")
    at = run_app()
    for coll in ("faces (shipped)", "fashion (shipped)", "lm (shipped)"):
        widget(at, "selectbox", "Collection").select(coll).run()
        for page in PAGES:
            at.switch_page(f"app_pages/{page}.py")
            at.run()
            assert_clean(at)
            if page == "generate" and coll.startswith("faces"):
                # starts from the LoRA's identity described in the base model's words, at the base's guidance scale
                from lol.collection import open_collection
                from lol.zoo.faces import Identity, caption

                table = open_collection(root / "collections" / "faces").table.set_index("id")
                ident = int(table.loc[at.selectbox(key="gen_lora").value, "identity"])
                prompt = widget(at, "text_area", "Prompts (one per line)").value
                assert prompt == caption(Identity.from_seed(ident).attributes())
                assert widget(at, "slider", "Guidance scale").value == 4.0
                widget(at, "slider", "Steps").set_value(2)
                at.button(key="gen_go").click().run()
                assert_clean(at)
                caps = [i.proto.imgs[0].caption for i in at.image]  # finetuning image | base | LoRA | difference
                assert len(caps) == 4 and caps[0].startswith("trained on: a photo of"), caps
                assert "CLIP" in caps[1] and "CLIP" in caps[2]
            if page == "generate" and coll.startswith("fashion"):
                # a garment of the LoRA's own classes, scored with the CLIP model of the same base (recorded by
                # the faces collection: fashion records only its sd base)
                prompt = widget(at, "text_area", "Prompts (one per line)").value
                assert prompt.startswith("a photo of a") and "person" not in prompt
                widget(at, "slider", "Steps").set_value(2)
                at.button(key="gen_go").click().run()
                assert_clean(at)
                caps = [i.proto.imgs[0].caption for i in at.image]
                assert any(c.startswith("base · CLIP ") for c in caps), caps
