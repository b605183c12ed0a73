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
