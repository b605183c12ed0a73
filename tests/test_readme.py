"""The README's Python quick start runs as written (on the shipped lm collection)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    if not (ROOT / "data/collections/lm/collection.json").exists():
        pytest.skip("the shipped lm collection is not in data/collections/lm")
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.replace("/tmp/my_lora", str(tmp_path / "my_lora"))
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    diff = scope["model"](scope["batch"]) - scope["model"](scope["moved"])
    assert float(diff.abs().max()) < 1e-9
