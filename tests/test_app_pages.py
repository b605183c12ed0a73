"""Every page of the explorer under streamlit's AppTest: it renders without an exception, its key widgets are there,
and the main interactions behave (choose a LoRA, change the colour or a model, upload a bad file, missing data)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import app_support

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("appdata")
    root = app_support.data_root(tmp)
    app_support.lm_like(root / "collections" / "lm")
    res = root / "results"
    res.mkdir()
    pd.DataFrame({"model": ["glnet", "glnet", "mlp", "mlp"], "task": ["clip_score"] * 4,
                  "metric": ["r2", "kendall", "r2", "kendall"], "value": [0.81, 0.62, 0.35, 0.3]}).to_csv(
        res / "results.csv", index=False)
    return root


@pytest.fixture
def env(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LOL_DATA", str(data_root))
    monkeypatch.setenv("LOL_APP_CACHE", str(data_root.parent / "cache"))
    monkeypatch.setenv("LOL_APP_WARMUP", "0")
    return data_root


def run_app(page: str | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    return at


def assert_clean(at, allow_errors=False):
    assert not at.exception, [e.value for e in at.exception]
    if not allow_errors:
        assert not at.error, [e.value for e in at.error]


def widget(at, kind: str, label: str):
    found = [w for w in getattr(at, kind) if w.label == label]
    assert found, f"no {kind} labelled {label!r}: {[w.label for w in getattr(at, kind)]}"
    return found[0]


def markdown_text(at) -> str:
    return "\n".join(m.value for m in at.markdown)


# --------------------------------------------------------------------------------------------------- Collection

def test_collection_page_table_filters_and_detail(env):
    at = run_app()
    assert_clean(at)
    assert at.title[0].value == "Collection"
    for label in ("Collection", "Device", "LoRA", "Label"):
        widget(at, "selectbox", label)
    assert widget(at, "selectbox", "Collection").value == "faces (shipped)"
    assert widget(at, "selectbox", "Device").value in ("cpu", "cuda")
    assert "**40** of 40 LoRAs shown" in markdown_text(at)
    assert len(at.dataframe) >= 2  # the LoRA table and the module table (plus the detail table)

    widget(at, "text_input", "Search").input("identity-3").run()  # ids faces-006, faces-007
    assert_clean(at)
    assert "**2** of 40 LoRAs shown" in markdown_text(at)

    widget(at, "selectbox", "LoRA").select("faces-017").run()
    assert_clean(at)
    assert "faces-017" not in [None] and widget(at, "selectbox", "LoRA").value == "faces-017"
    detail = at.dataframe[-1].value  # per-module table of the detail view
    assert list(detail["module"]) == [m[0] for m in app_support.TINY_MODULES]
    # the detail is the chosen LoRA's: its ranks and ΔW norms come from that LoRA
    from lol.collection import open_collection

    lora = open_collection(env / "collections" / "faces").lora(17)
    assert detail["rank r"].tolist() == lora.ranks
    assert detail["‖ΔW‖_F"].tolist() == pytest.approx([m.delta_norm() for m in lora], rel=1e-6)
    ranks_metric = [m for m in at.metric if m.label == "ranks"][0]
    assert ranks_metric.value == str(lora.ranks[0])


def test_bad_upload_gives_a_plain_message_and_app_keeps_working(env):
    at = run_app()
    widget(at, "selectbox", "Collection").select("Uploaded LoRA files…").run()
    assert_clean(at)
    assert any("Upload one or more LoRA files" in i.value for i in at.info)
    up = at.sidebar.file_uploader[0]
    up.set_value([("broken.safetensors", b"\x00garbage", "application/octet-stream"),
                  ("adapter_config.json", b'{"r": 4}', "application/json"),
                  ("model.ckpt", b"PK\x03\x04", "application/octet-stream")]).run()
    assert not at.exception
    errors = [e.value for e in at.sidebar.error]
    assert any(e.startswith("model.ckpt: a pickled checkpoint (.ckpt) is not read") for e in errors), errors
    assert any("broken.safetensors" in e for e in errors), errors
    assert any("adapter_config.json" in e and "adapter_model.safetensors" in e for e in errors), errors
    assert any("None of the uploaded files" in i.value for i in at.info)
    # a good file next to the bad one opens as a one-LoRA collection
    good = app_support.diffusers_bytes(seed=3)
    at.sidebar.file_uploader[0].set_value([("broken.safetensors", b"\x00garbage", "application/octet-stream"),
                                           ("mine.safetensors", good, "application/octet-stream")]).run()
    assert not at.exception
    assert "**1** of 1 LoRAs shown" in markdown_text(at)
    assert widget(at, "selectbox", "LoRA").value == "mine.safetensors"
    assert any("broken.safetensors" in e.value for e in at.sidebar.error)
    assert not any("lol-upload-" in e.value for e in at.sidebar.error)  # no temporary path on screen
    # the uploaded collection survives a page switch (the sidebar, uploader included, is drawn once by app.py)
    at.switch_page("app_pages/embeddings.py")
    at.run()
    assert not at.exception
    assert at.title[0].value == "Embeddings"
    assert "1 LoRAs · 4 adapted modules" in [c.value for c in at.sidebar.caption]
    assert not any("Upload one or more LoRA files" in i.value for i in at.info)


def test_no_pages_folder_beside_the_entrypoint():
    """A folder named pages/ beside app.py (even one left holding only __pycache__) makes streamlit run its scripts
    without app.py — no sidebar, no error boundary — and show its own navigation beside ours: the pages live in
    app_pages/."""
    assert not (Path(APP).parent / "pages").exists()
    from lol.app.nav import PAGES

    assert sorted(f for f, _, _ in PAGES) == sorted(p.name for p in (Path(APP).parent / "app_pages").glob("*.py"))


def test_server_folders_are_off_unless_the_operator_allows_them(env, monkeypatch):
    monkeypatch.delenv("LOL_ALLOW_SERVER_FOLDERS", raising=False)
    monkeypatch.delenv("LOL_FOLDER_ROOTS", raising=False)
    at = run_app()
    assert "A folder or packed collection on the server…" not in widget(at, "selectbox", "Collection").options


def test_server_path_outside_the_allowed_roots_is_refused(env, tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "l0.safetensors").write_bytes(app_support.diffusers_bytes(seed=0))
    (allowed / "link").symlink_to(tmp_path / "outside")  # a symlink out of the root is outside too
    monkeypatch.setenv("LOL_FOLDER_ROOTS", str(allowed))
    at = run_app()
    widget(at, "selectbox", "Collection").select("A folder or packed collection on the server…").run()
    for typed in ("/etc", str(tmp_path / "outside"), str(allowed / ".." / "outside"), str(allowed / "link")):
        widget(at, "text_input", "Path on the server").input(typed).run()
        assert_clean(at)
        assert any("outside the folders this server allows" in i.value for i in at.info), (typed, at.info)
        assert not at.dataframe, typed  # nothing was read


def test_server_folder_scan_is_bounded(tmp_path, monkeypatch):
    from lol.uploads import pack_folder
    from lol.errors import LoLError
    from lol.packing import scan

    for i in range(5):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / f"x{i}.safetensors").write_bytes(b"")
    assert len(scan(tmp_path, limit=10)[0]) == 5
    with pytest.raises(LoLError, match="more than 9 files"):
        scan(tmp_path, limit=9)
    monkeypatch.setenv("LOL_FOLDER_MAX_FILES", "9")  # the app's folder source scans within its bound
    with pytest.raises(LoLError, match="more than 9 files"):
        pack_folder(tmp_path, tmp_path.parent / "packed")


def test_server_path_missing_then_folder_of_loose_files(env, tmp_path, monkeypatch):
    monkeypatch.setenv("LOL_FOLDER_ROOTS", str(tmp_path))
    at = run_app()
    widget(at, "selectbox", "Collection").select("A folder or packed collection on the server…").run()
    widget(at, "text_input", "Path on the server").input(str(tmp_path / "nope")).run()
    assert_clean(at)
    assert any("no such file or folder" in i.value for i in at.info)
    folder = tmp_path / "loose"
    folder.mkdir()
    for i in range(3):
        (folder / f"l{i}.safetensors").write_bytes(app_support.diffusers_bytes(seed=i))
    widget(at, "text_input", "Path on the server").input(str(folder)).run()
    assert_clean(at)
    assert "**3** of 3 LoRAs shown" in markdown_text(at)


def test_missing_default_data_every_page_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("LOL_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("LOL_APP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOL_APP_WARMUP", "0")
    at = run_app()
    for page in ("collection", "predict", "embeddings", "generate", "membership", "language_models", "models"):
        at.switch_page(f"app_pages/{page}.py")
        at.run()
        assert_clean(at)
        assert at.info, f"{page}: no explanation shown"


# --------------------------------------------------------------------------------------------------- Embeddings

def test_embeddings_page_map_colour_and_gl_note(env):
    at = run_app("app_pages/embeddings.py")
    assert_clean(at)
    src = widget(at, "selectbox", "Embed")
    assert src.value.startswith("Singular values")
    colour = widget(at, "selectbox", "Colour by (label, attribute, hyperparameter, prediction or error)")
    assert colour.value == "clip_score"
    chart = at.get("plotly_chart")
    assert chart, "no map drawn"
    colour.select("male").run()
    assert_clean(at)
    # the GL note: raw factors move under a random GL(r) transform, invariant features do not
    at.toggle[0].set_value(True).run()
    assert_clean(at)
    m = {x.label: float(x.value) for x in at.metric}
    assert m["raw factors: relative change under GL"] > 0.1
    assert m["singular values of ΔW: relative change under GL"] < 1e-10


# ------------------------------------------------------------------------------------------------------- Models

def test_models_page_reads_notebook_results(env):
    at = run_app("app_pages/models.py")
    assert_clean(at)
    table = at.dataframe[0].value
    assert table.loc["glnet", "clip_score · R²"] == pytest.approx(0.81)
    assert any("No checkpoints" in i.value for i in at.info)


# ------------------------------------------------------------------------------------------- Membership / LM

def test_membership_without_model_shows_truth(env):
    at = run_app()
    widget(at, "selectbox", "Collection").select("lm (shipped)").run()
    at.switch_page("app_pages/membership.py")
    at.run()
    assert_clean(at)
    assert any("No trained LoL model predicts" in i.value for i in at.info)


def test_membership_on_a_collection_without_it_offers_the_shipped_ones_that_have_it(env):
    at = run_app("app_pages/membership.py")                   # the sidebar opens on faces: no membership labels
    assert_clean(at)
    assert any("has no membership labels" in i.value for i in at.info)
    button = next(b for b in at.button if b.label.startswith("Open the lm collection"))
    assert button.label == "Open the lm collection (membership: 5 labels)"   # faces itself is not offered
    assert not any(b.label.startswith("Open the faces") for b in at.button)
    button.click().run()
    assert_clean(at)
    assert widget(at, "selectbox", "Collection").value == "lm (shipped)"   # the sidebar follows …
    assert any("No trained LoL model predicts" in i.value for i in at.info)  # … and the page shows lm's membership


def test_language_models_page_finds_lm_collection(env):
    at = run_app("app_pages/language_models.py")  # sidebar on faces: the page opens the shipped lm collection itself
    assert_clean(at)
    assert "lm (shipped)" in markdown_text(at) or any("lm" in c.value for c in at.caption)
    widget(at, "selectbox", "Label")


def test_state_is_in_the_url_and_a_prepared_url_opens_that_view(env):
    from streamlit.testing.v1 import AppTest

    at = run_app()
    widget(at, "selectbox", "LoRA").select("faces-017").run()
    assert at.query_params["collection"] == "faces" and at.query_params["lora"] == "faces-017"
    # a bookmarked address opens the lm collection with its LoRA chosen, on the page in its path
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["collection"] = "lm"
    at.query_params["lora"] = "lm-012"
    at.run()
    assert_clean(at)
    assert widget(at, "selectbox", "Collection").value == "lm (shipped)"
    assert widget(at, "selectbox", "LoRA").value == "lm-012"


def _ringed(at) -> list[list[str]]:
    """Per plotly chart on the page: the LoRA ids in its 'selected' trace (the linked-selection rings)."""
    import json

    out = []
    for chart in at.get("plotly_chart"):
        fig = json.loads(chart.proto.spec)
        out.append([c[0] for t in fig["data"] if t.get("name") == "selected" for c in t["customdata"]])
    return out


def test_linked_selection_rings_the_lora_on_every_chart(env, tmp_path, monkeypatch):
    """A LoRA chosen on one page (a select box) is ringed on the Embeddings map; a box drawn on the map selects all
    LoRAs in it, and they are ringed on the map at once and stay the selection on the other pages."""
    import shutil

    from lol.precomputed import write_precomputed

    shutil.copytree(env, tmp_path / "data")
    write_precomputed(tmp_path / "data" / "collections" / "faces")  # the maps as shipped: no UMAP in the page
    monkeypatch.setenv("LOL_DATA", str(tmp_path / "data"))
    at = run_app()
    at.selectbox(key="coll_detail").select("faces-007").run()
    at.switch_page("app_pages/embeddings.py").run()
    assert_clean(at)
    assert _ringed(at)[0] == ["faces-007"]
    # a box on the map (as streamlit reports it: the selected points with their custom data)
    box = {"selection": {"points": [{"customdata": ["faces-003"]}, {"customdata": ["faces-011"]}],
                         "box": [{"x": [0, 1], "y": [0, 1]}], "point_indices": [3, 11], "lasso": []}}
    at.session_state["emb_map"] = box
    at.run()
    assert_clean(at)
    assert sorted(_ringed(at)[0]) == ["faces-003", "faces-011"]
    assert "**Selected:** faces-003, faces-011" in markdown_text(at)
    at.switch_page("app_pages/collection.py").run()
    assert at.selectbox(key="coll_detail").value == "faces-003"  # the first of the box is the chosen LoRA
