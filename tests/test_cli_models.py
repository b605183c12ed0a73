import json

import pytest
import torch

from lol.cli import main
from lol.formats import save_diffusers, save_peft
from lol.lora import LoRA
from lol.synth import random_lora, synth_collection, tiny_spec


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("c") / "synth"
    synth_collection(tiny_spec(), 120, ranks=(2, 4), seed=0).write(d)
    yield d
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(coll, tmp_path_factory):
    out = tmp_path_factory.mktemp("k") / "ck"
    assert main(["train", "--collection", str(coll), "--task", "sv_energy,probe_positive", "--model", "glnet",
                 "--out", str(out), "--epochs", "3", "--no-progress"]) == 0
    return out


def test_train_writes_checkpoint_and_prints_test_metrics(coll, ckpt, capsys, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["kind"] == "glnet" and [l["name"] for l in cfg["labels"]] == ["sv_energy", "probe_positive"]
    assert cfg["labels"][0]["kind"] == "regression" and cfg["labels"][1]["kind"] == "binary"
    assert len(cfg["fingerprint"]) == 64 and cfg["spec"]["names"] == list(tiny_spec().names)
    assert "r2" in cfg["metrics"]["test"]["sv_energy"] and "auc" in cfg["metrics"]["test"]["probe_positive"]
    assert (ckpt / "model.safetensors").is_file()
    # a task name works too, and the output names the metrics
    out = tmp_path / "ck2"
    assert main(["train", "--collection", str(coll), "--task", "direction", "--model", "svals", "--out", str(out),
                 "--epochs", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "test probe: r2" in text and "kendall" in text and "test probe_positive: accuracy" in text


def test_predict_reads_files_of_any_format(ckpt, tmp_path, capsys):
    spec = tiny_spec()
    a = save_peft(random_lora(spec, 4, seed=1), tmp_path / "a")
    b = save_diffusers(random_lora(spec, 8, seed=2), tmp_path / "b.safetensors")  # unseen rank: GL-net is fine
    assert main(["predict", "--checkpoint", str(ckpt), str(a), str(b), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in res] == [str(a), str(b)]
    for r in res:
        assert set(r["predictions"]) == {"sv_energy", "probe_positive"}
        assert 0 <= r["predictions"]["probe_positive"] <= 1
    assert main(["predict", "--checkpoint", str(ckpt), str(a)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split("\t") == ["path", "sv_energy", "probe_positive"] and len(lines) == 2


def test_predict_names_a_spec_mismatch(ckpt, tmp_path, capsys):
    lora = random_lora(tiny_spec(), 4, seed=3)
    first = lora.names[0]
    broken = LoRA.from_modules([m for m in lora if m.name != first])
    path = save_diffusers(broken, tmp_path / "broken.safetensors")
    assert main(["predict", "--checkpoint", str(ckpt), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and first.split(".")[-1] in err


def test_predict_default_checkpoint_and_bad_checkpoint(ckpt, coll, tmp_path, capsys, monkeypatch):
    """``lol predict --task`` reads ``$LOL_DATA/checkpoints/index.json`` from any working directory, and refuses a
    default that is not GL(r)-invariant."""
    path = save_peft(random_lora(tiny_spec(), 4, seed=4), tmp_path / "x")
    monkeypatch.chdir(tmp_path)  # not the repository: the data folder comes from LOL_DATA, never from the cwd
    monkeypatch.setenv("LOL_DATA", str(tmp_path / "none"))
    assert main(["predict", "--task", "sv_energy", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no default checkpoint for 'sv_energy'" in err and str(tmp_path / "none") in err
    data = tmp_path / "data"
    (data / "checkpoints").mkdir(parents=True)
    (data / "checkpoints" / "index.json").write_text(json.dumps({"sv_energy": str(ckpt)}))
    monkeypatch.setenv("LOL_DATA", str(data))
    assert main(["predict", "--task", "sv_energy", str(path), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)[0]["predictions"]) == {"sv_energy"}
    assert main(["predict", "--checkpoint", str(tmp_path), str(path)]) == 2
    assert "not a LoL checkpoint (missing config.json)" in capsys.readouterr().err
    # an O(r)-only model (oalign) is never served as a default, only when asked for by its path
    for kind in ("oalign",):
        other = tmp_path / f"ck_{kind}"
        assert main(["train", "--collection", str(coll), "--task", "sv_energy", "--model", kind, "--out", str(other),
                     "--epochs", "1", "--no-progress"]) == 0
        capsys.readouterr()
        (data / "checkpoints" / "index.json").write_text(json.dumps({"sv_energy": str(other)}))
        uniform = save_peft(random_lora(tiny_spec(), 4, seed=5), tmp_path / f"u_{kind}")
        assert main(["predict", "--task", "sv_energy", str(uniform)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and f"'{kind}' model" in err and "not GL(r)" in err and "--checkpoint" in err
        assert main(["predict", "--checkpoint", str(other), str(uniform)]) == 0
        capsys.readouterr()


def test_train_offers_every_registry_kind():
    from lol.cli import build_parser
    from lol.models import MODELS

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    model = next(a for a in train._actions if a.dest == "model")
    assert tuple(model.choices) == tuple(MODELS) and {"colspace", "colsketch"} <= set(model.choices)
