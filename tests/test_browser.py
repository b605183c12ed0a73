"""End to end in a real headless Chromium (Debian ``chromium`` driven by playwright): start the app as ``make app``
does (``python scripts/serve.py``) on a free localhost port, visit every page through the sidebar navigation at
1280×720, do one interaction per page (Compare-with, an upload, a generation, questions answered by a language
model and its LoRA …), assert no error element is shown, save a screenshot per page under artifacts/screenshots/,
and print load timings (server start → first page interactive; first and second visit of every page)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

import app_support

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ERRORS = '[data-testid="stException"], [data-testid="stAlertContentError"]'


def _chromium() -> str | None:
    for c in (CHROMIUM, shutil.which("chromium"), shutil.which("chromium-browser")):
        if c and os.path.exists(c):
            return c
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    root = app_support.generation_root(tmp, n=30)
    app_support.lm_with_base(root)  # on a real tiny Qwen2, with the finetuning sources of each LoRA recorded
    app_support.train_checkpoints(root, epochs=4)
    res = root / "results"
    res.mkdir()
    pd.DataFrame({"model": ["glnet", "glnet", "svals", "svals"], "task": ["clip_score"] * 4,
                  "metric": ["r2", "kendall", "r2", "kendall"], "value": [0.81, 0.62, 0.55, 0.41]}).to_csv(
        res / "results.csv", index=False)
    pd.DataFrame({"model": ["glnet", "svals"], "task": ["membership"] * 2, "metric": ["auc"] * 2,
                  "value": [0.9, 0.8]}).to_csv(res / "membership_results.csv", index=False)
    return root


@pytest.fixture(scope="module")
def server(data_root):
    port = _free_port()
    env = {**os.environ, "LOL_DATA": str(data_root), "LOL_APP_CACHE": str(data_root.parent / "cache"),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = open(data_root.parent / "streamlit.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"),  # as `make app`: warm-up at start
                             "--server.port", str(port), "--server.address", "localhost",
                             "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://localhost:{port}"
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.1)
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited: {(data_root.parent / 'streamlit.log').read_text()[-2000:]}")
        else:
            raise RuntimeError("streamlit did not become healthy within 60 s")
        yield url, t0
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _idle(page, timeout=90_000):
    """Wait until the script run has finished: streamlit marks its root with ``data-test-script-state``."""
    page.wait_for_timeout(200)
    page.wait_for_function(
        "() => { const a = document.querySelector('[data-testid=\"stApp\"]');"
        " return a && a.getAttribute('data-test-script-state') === 'notRunning'; }", timeout=timeout)
    page.wait_for_timeout(100)


def _title(page, text, timeout=90_000):
    page.get_by_role("heading", name=text, exact=True).first.wait_for(timeout=timeout)
    _idle(page, timeout)


def _no_errors(page, where):
    bad = page.locator(ERRORS)
    texts = [bad.nth(i).inner_text()[:300] for i in range(bad.count())]
    assert not texts, f"{where}: error element(s) on screen: {texts}"


def _select(page, label, option):
    """Choose ``option`` in the st.selectbox labelled ``label``."""
    page.get_by_role("combobox", name=label).first.click()
    page.keyboard.type(option[:40])  # filter the list: at 1280×720 a long list shows only a few options
    page.get_by_role("option", name=option, exact=True).first.click()


def _goto(page, title):
    """Click the page's link in the sidebar navigation (same browser session) and wait until it is drawn."""
    from lol.app.nav import PAGES

    index = [t for _, t, _ in PAGES].index(title)  # links are in page order (the default page's href is "/")
    page.locator('[data-testid="stSidebarNav"] a').nth(index).click()
    t = time.perf_counter()
    _title(page, title)
    return time.perf_counter() - t


def test_every_page_in_a_real_browser(server, data_root, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; scripts/system-deps installs it)")
    from playwright.sync_api import sync_playwright

    url, t_start = server
    SHOTS.mkdir(parents=True, exist_ok=True)
    timings: dict[str, list[float]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})  # a projector; screenshots at this size
        try:
            first_page = _visit_all(page, url, t_start, timings, data_root, tmp_path)
        except Exception:
            page.screenshot(path=str(SHOTS / "failure.png"))  # what was on screen when it failed
            raise
        browser.close()
    _report(first_page, timings)


def _visit_all(page, url, t_start, timings, data_root, tmp) -> float:
    """Every page with one interaction each, then every page again; returns server start → first page (s)."""
    page.goto(url)
    _title(page, "Collection", timeout=120_000)
    first_page = time.perf_counter() - t_start
    _no_errors(page, "Collection")

    # Collection: search the table
    page.get_by_role("textbox", name="Search", exact=True).fill("identity-1")
    page.keyboard.press("Enter")
    page.get_by_text("of 30 LoRAs shown").wait_for()
    _idle(page)
    page.locator("text=/\\*?\\*?2\\*?\\*? of 30 LoRAs shown/").first.wait_for(timeout=30_000)
    _no_errors(page, "Collection after search")
    page.screenshot(path=str(SHOTS / "collection.png"))

    visits = [("Predict", "predict"), ("Embeddings", "embeddings"), ("Generate", "generate"),
              ("Membership", "membership"), ("Language models", "language_models"), ("Models", "models")]
    for title, name in visits:
        timings[title] = [_goto(page, title)]
        _no_errors(page, title)
        if name == "predict":
            _select(page, "Compare with", "faces/svals — clip_score, male, … (4 labels) · singular-value MLP")
            page.get_by_text("R²", exact=True).nth(1).wait_for(timeout=60_000)  # a second model's panel
            _idle(page)
            _no_errors(page, "Predict after Compare with")
            # upload: one LoRA for this base gets predictions and nearest LoRAs, a pickle is explained in words
            good, pickled = tmp / "mine.safetensors", tmp / "model.bin"
            from lol.collection import open_collection
            from lol.formats import save_diffusers

            save_diffusers(open_collection(data_root / "collections" / "faces").lora(3), good)
            pickled.write_bytes(b"PK\x03\x04")
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').last.set_input_files([str(good), str(pickled)])
            page.get_by_text("Nearest LoRAs in the faces collection").first.wait_for(timeout=60_000)
            page.get_by_text("model.bin: a pickled checkpoint (.bin) is not read").first.wait_for(timeout=10_000)
            _idle(page)
            page.screenshot(path=str(SHOTS / "predict_upload.png"))
        elif name == "embeddings":
            _select(page, "Colour by", "male")
            _idle(page)
            page.get_by_text("male = True").first.wait_for(timeout=30_000)
        elif name == "generate":
            page.get_by_role("button", name="Settings").click()  # seeds, steps, guidance, strength: a popover
            page.get_by_role("textbox", name="Seeds", exact=True).fill("42, 43")
            page.keyboard.press("Enter")
            _idle(page)
            steps = page.get_by_role("slider").first  # Steps: 1 + 3 = 4 sampling steps keep the CPU run short
            steps.focus()
            page.keyboard.press("Home")
            for _ in range(3):
                page.keyboard.press("ArrowRight")
            _idle(page)
            page.keyboard.press("Escape")  # close the popover
            page.get_by_role("button", name="Generate", exact=True).click()
            _idle(page, timeout=180_000)
            page.get_by_text("Done in").first.wait_for(timeout=300_000)  # a loaded CI machine is slow
            page.get_by_text("4 steps").first.wait_for(timeout=10_000)
            images = page.locator('[data-testid="stImage"]')
            images.nth(5).wait_for(timeout=60_000)  # the grid renders after the progress text
            assert images.count() == 6  # 2 seeds × (base | LoRA | difference): no finetuning images recorded here
            page.get_by_role("button", name="PNG of the grid").wait_for(timeout=10_000)
        elif name == "membership":
            _select(page, "Collection", "lm (shipped)")
            _idle(page)
            slider = page.get_by_role("slider").first
            slider.focus()
            for _ in range(10):
                page.keyboard.press("ArrowRight")
            _idle(page)
            page.get_by_text("threshold 0.60").first.wait_for(timeout=30_000)
        elif name == "language_models":
            page.get_by_text("Source membership").first.wait_for()
            _select(page, "LoRA", "lm-00005")
            _idle(page)
        elif name == "models":
            _select(page, "Results table", "membership_results")
            _idle(page)
            page.get_by_text("membership · AUC").first.wait_for(state="attached", timeout=30_000)  # grid cells are drawn on a canvas
        if name != "predict":  # Predict now shows the pickle's message, on purpose
            _no_errors(page, f"{title} after its interaction")
        page.screenshot(path=str(SHOTS / f"{name}.png"))
    _generate_lm(page, data_root)
    # second visits: every page again, now warm
    _select(page, "Collection", "faces (shipped)")
    _idle(page)
    for title, _ in [("Collection", "collection")] + visits:
        timings.setdefault(title, [float("nan")]).append(_goto(page, title))
        _no_errors(page, f"{title} (second visit)")
    return first_page


def _generate_lm(page, data_root):
    """Generate on the language-model collection (chosen on Membership): held-out questions of the LoRA chosen on the
    Language models page, answered by the base LM and by the LoRA side by side (`lol.showcase.answer_side_by_side`)."""
    from lol import showcase
    from lol.collection import open_collection

    coll = open_collection(data_root / "collections" / "lm")
    _, mine = showcase.lm_sources(coll, "lm-00005")
    items = showcase.lm_questions(coll, "lm-00005", mine[:3], 2)  # 2 held-out questions of each source shown
    _goto(page, "Generate")
    _no_errors(page, "Generate (language model)")
    page.get_by_text(f"{mine[0]} (finetuned on)").first.wait_for(timeout=10_000)  # its own sources, chosen first
    page.get_by_role("button", name="Answer", exact=True).click()
    _idle(page, timeout=180_000)
    page.get_by_text("Right on these questions").first.wait_for(timeout=300_000)
    page.locator(f"text=/^\\d+\\/{len(items)} LoRA$/").first.wait_for(timeout=10_000)
    page.get_by_text("Measured challenge_accuracy").first.wait_for(timeout=10_000)
    page.get_by_text("vs base (0.3)").first.wait_for(timeout=10_000)  # the base's own accuracy, from its record
    # one row per question, the base's and the LoRA's picks side by side (grid cells are drawn on a canvas)
    for text in ("question", "right answer", "base picks", "LoRA picks", items[0].question, items[-1].question):
        page.get_by_text(text, exact=True).first.wait_for(state="attached", timeout=30_000)
    _no_errors(page, "Generate (language model) after Answer")
    page.screenshot(path=str(SHOTS / "generate_lm.png"))


def _report(first_page, timings):
    print(f"\n[browser timings] server start → Collection interactive: {first_page:.1f} s")
    for title, ts in timings.items():
        print(f"[browser timings] {title:16s} first visit {ts[0]:5.1f} s · second visit {ts[-1]:5.1f} s")
    print(f"[browser timings] screenshots: {SHOTS}")
    assert all(p.is_file() for p in (SHOTS / f"{n}.png" for n in ("collection", "predict", "embeddings", "generate",
                                                                   "generate_lm", "membership", "language_models",
                                                                   "models")))
