"""`lol inspect / import / export / synth` end to end, in-process through `lol.cli.main` (same code path as the
console script), plus one real subprocess run of `python -m lol`."""
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from lol import open_collection, read_lora, save_diffusers, save_peft
from lol.cli import main
from lol.synth import random_lora, tiny_spec


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _tree(root):
    """Mixed formats: 3 diffusers files, 1 PEFT folder, 1 kohya-style file of another base model, 1 corrupt file."""
    spec = tiny_spec()
    (root / "sub").mkdir(parents=True)
    for i in range(3):
        save_diffusers(random_lora(spec, 4, alpha=8.0, seed=i), root / f"d{i}.safetensors", dtype=torch.float16)
    save_peft(random_lora(spec, 2, seed=9), root / "sub" / "peft_one")
    save_file({"lora_unet_other_to_q.lora_down.weight": torch.randn(2, 5),
               "lora_unet_other_to_q.lora_up.weight": torch.randn(5, 2)}, str(root / "sub" / "kohya.safetensors"))
    (root / "sub" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{oops")
    return spec


def test_inspect_table_and_exact_json(tmp_path, capsys):
    lora = random_lora(tiny_spec(), 4, alpha=27.0, seed=0)
    f = save_diffusers(lora, tmp_path / "x.safetensors")
    rc, out, _ = run(capsys, "inspect", f)
    assert rc == 0 and "unet.down.attn2.to_v" in out and "8×6" in out and "6.75" in out
    rc, out, _ = run(capsys, "inspect", f, "--json")
    d = json.loads(out)
    assert set(d) == {"path", "format", "modules", "full_weight_modules", "metadata"} and d["format"] == "diffusers"
    assert d["full_weight_modules"] == []
    assert set(d["modules"][0]) == {"name", "out_features", "in_features", "rank", "alpha", "scale", "delta_norm"}
    m = d["modules"][1]
    assert (m["name"], m["out_features"], m["in_features"], m["rank"], m["alpha"]) == \
        ("unet.down.attn2.to_v", 8, 6, 4, 27.0)
    ref = float(torch.linalg.norm(lora["unet.down.attn2.to_v"].delta().double()))
    assert abs(m["delta_norm"] - ref) < 1e-5 * ref
    assert "lora_adapter_metadata" in d["metadata"]
    rc, out, _ = run(capsys, "inspect", save_peft(lora, tmp_path / "p"), "--json")
    assert json.loads(out)["metadata"]["adapter_config"]["lora_alpha"] == 27.0


def test_inspect_errors_are_one_line(tmp_path, capsys):
    rc, out, err = run(capsys, "inspect", tmp_path / "missing.safetensors")
    assert rc == 2 and err.startswith("error: ") and "missing.safetensors" in err and err.count("\n") == 1
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    rc, _, err = run(capsys, "inspect", tmp_path / "bad.safetensors")
    assert rc == 2 and "bad.safetensors" in err and "exceeds the file size" in err and "Traceback" not in err


def test_import_packs_mixed_formats_reports_skips_and_is_deterministic(tmp_path, capsys):
    src = tmp_path / "src"
    spec = _tree(src)
    labels = pd.DataFrame({"path": [str(src / "d0.safetensors"), "d2.safetensors", "sub/peft_one", "nowhere"],
                           "score": [0.5, 1.5, 2.5, 9.0], "good": [1, 0, 1, 1]})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    rc, out, err = run(capsys, "import", src, tmp_path / "c1", "--labels", tmp_path / "labels.csv",
                       "--base-model", "tiny-sd")
    assert rc == 0, err
    assert "packed 4 LoRAs" in out
    assert "sub/kohya.safetensors" in err and "differ from the majority" in err
    assert "sub/broken.safetensors" in err and "unreadable" in err
    assert "match no imported LoRA" in err and "packing" in err  # progress bar on stderr
    c = open_collection(tmp_path / "c1")
    assert c.ids == ["d0.safetensors", "d1.safetensors", "d2.safetensors", "sub/peft_one"]
    assert c.base_model == "tiny-sd" and c.labels["score"]["kind"] == "regression"
    assert c.labels["good"]["kind"] == "binary"
    assert c.table["score"].tolist()[0] == 0.5 and pd.isna(c.table["score"][1]) and c.table["score"][3] == 2.5
    assert c.table["format"].tolist() == ["diffusers"] * 3 + ["peft"]
    assert c.ranks[:, 0].tolist() == [4, 4, 4, 2]
    for i, p in enumerate([src / "d0.safetensors", src / "d1.safetensors", src / "d2.safetensors",
                           src / "sub" / "peft_one"]):
        orig = read_lora(p)
        for m in orig:
            d = m.delta().double()
            assert float((c.lora(i)[m.name].delta().double() - d).abs().max()) <= 2e-3 * float(d.abs().max())
        assert c.lora(i)[spec.names[0]].alpha == orig[spec.names[0]].alpha
    rc, _, _ = run(capsys, "import", src, tmp_path / "c2", "--labels", tmp_path / "labels.csv",
                   "--base-model", "tiny-sd")
    for name in ("collection.json", "factors.safetensors", "loras.parquet"):
        assert (tmp_path / "c1" / name).read_bytes() == (tmp_path / "c2" / name).read_bytes()
    rc, _, err = run(capsys, "import", src, tmp_path / "c1")
    assert rc == 2 and "already exists" in err


def test_import_drops_files_with_bad_data_found_only_when_reading(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    spec = tiny_spec()
    for i in range(3):
        lora = random_lora(spec, 2, seed=i)
        if i == 1:
            m = lora[spec.names[0]]
            U = m.U.clone()
            U[0, 0] = float("nan")
            lora.modules[m.name] = m.with_factors(U, m.V)
        save_diffusers(lora, src / f"l{i}.safetensors")
    rc, out, err = run(capsys, "import", src, tmp_path / "c")
    assert rc == 0 and "packed 2 LoRAs" in out and "l1.safetensors" in err and "NaN" in err
    assert open_collection(tmp_path / "c").ids == ["l0.safetensors", "l2.safetensors"]


def test_export_round_trip_both_formats(tmp_path, capsys):
    rc, _, err = run(capsys, "synth", "--spec", "tiny", "--n", "4", "--rank", "2,4", "--out", tmp_path / "c",
                     "--packed", "--alpha", "16")
    assert rc == 0, err
    c = open_collection(tmp_path / "c")
    for fmt in ("diffusers", "peft"):
        rc, _, err = run(capsys, "export", tmp_path / "c", tmp_path / fmt, "--format", fmt)
        assert rc == 0, err
        table = pd.read_csv(tmp_path / fmt / "labels.csv")
        assert len(table) == 4 and "sv_energy" in table.columns
        for i, rel in enumerate(table["path"]):
            back = read_lora(tmp_path / fmt / rel)
            assert back.format == fmt
            for m in c.lora(i):
                assert back[m.name].alpha == 16.0 and back[m.name].rank == m.rank
                assert torch.allclose(back[m.name].delta(), m.delta(), rtol=1e-5, atol=1e-6)
        rc, _, err = run(capsys, "import", tmp_path / fmt, tmp_path / f"re_{fmt}", "--labels",
                         tmp_path / fmt / "labels.csv")
        assert rc == 0, err
        re = open_collection(tmp_path / f"re_{fmt}")
        assert torch.equal(re.batch().U[2], c.batch().U[2]) and re.table["sv_energy"].equals(c.table["sv_energy"])


def test_synth_files_then_import_with_label_schema(tmp_path, capsys):
    rc, out, err = run(capsys, "synth", "--spec", "tiny", "--n", "6", "--rank", "3", "--out", tmp_path / "s")
    assert rc == 0, err
    assert len(list((tmp_path / "s").glob("*.safetensors"))) == 6
    assert read_lora(tmp_path / "s" / "synth-00000.safetensors").ranks == [3, 3, 3]
    rc, _, err = run(capsys, "import", tmp_path / "s", tmp_path / "c", "--labels", tmp_path / "s" / "labels.csv")
    assert rc == 0, err
    c = open_collection(tmp_path / "c")
    assert c.label_columns("spectrum") == ["sv_energy", "sv_high"] and len(c) == 6
    rc, out, _ = run(capsys, "inspect", tmp_path / "c")
    assert rc == 0 and "packed collection of 6 LoRAs" in out and "sv_energy" in out
    rc, out, _ = run(capsys, "inspect", tmp_path / "c", "--json")
    d = json.loads(out)
    assert d["format"] == "collection" and d["n"] == 6 and d["modules"][0]["rmax"] == 3


def test_console_entry_point_subprocess(tmp_path):
    f = save_diffusers(random_lora(tiny_spec(), 2, seed=0), tmp_path / "x.safetensors")
    r = subprocess.run([sys.executable, "-m", "lol", "inspect", str(f), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["modules"][0]["rank"] == 2
    r = subprocess.run([sys.executable, "-m", "lol", "inspect", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "nope" in r.stderr


@pytest.mark.parametrize("bad", [["synth", "--n", "0", "--out", "x"], ["synth", "--rank", "a", "--out", "x"]])
def test_synth_argument_errors(bad, capsys, tmp_path):
    rc, _, err = run(capsys, *bad)
    assert rc == 2 and err.startswith("error: ")


def test_import_packs_peft_folders_without_component_with_diffusers_files(tmp_path, capsys):
    """PEFT folders name UNet modules without ``unet.``; diffusers files with it. One import packs both."""
    from dataclasses import replace

    from lol.lora import LoRA

    spec = tiny_spec()
    src = tmp_path / "src"
    src.mkdir()
    bare = [LoRA.from_modules(replace(m, name=m.name.removeprefix("unet.")) for m in random_lora(spec, 2, seed=s))
            for s in (0, 1)]
    for i, lo in enumerate(bare):
        save_peft(lo, src / f"peft{i}")
    save_diffusers(random_lora(spec, 4, seed=7), src / "z.safetensors")
    rc, out, err = run(capsys, "import", src, tmp_path / "c")
    assert rc == 0 and "packed 3 LoRAs" in out and "skipped" not in err, err
    c = open_collection(tmp_path / "c")
    assert c.ids == ["peft0", "peft1", "z.safetensors"] and c.ranks[:, 0].tolist() == [2, 2, 4]
    z = read_lora(src / "z.safetensors")
    assert c.spec.names == tuple(bare[0].names) and not set(c.spec.keys) & set(z.spec.keys)  # z matched by prefix rule
    for i, lo in enumerate([*bare, z]):
        for name, m in zip(c.spec.names, c.spec.match(lo)):
            d = m.delta().double()
            assert float((c.lora(i)[name].delta().double() - d).abs().max()) <= 2e-3 * float(d.abs().max())
