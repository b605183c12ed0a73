"""The adapter files people actually have, written by peft's own ``save_pretrained`` on tiny randomly initialised
transformers models (built from a config: no download):

* sequence-classification LoRAs carry full-weight tensors beside the pairs (``score`` / ``classifier`` heads,
  trained biases): the pairs are read exactly, the full-weight tensors listed (LoRA, `lol inspect` table and JSON),
  and `lol predict` works on the file;
* AdaLoRA (ΔW in SVD form) is read as the LoRA it is exactly;
* every other adapter type is refused with one ``error:`` line that says what the file is.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from lol import read_lora, save_peft
from lol.cli import main

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def _gpt2_cls():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, num_labels=3,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return transformers.GPT2ForSequenceClassification(cfg)


def _bert_cls(layers=2):
    cfg = transformers.BertConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=64, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def _save(model, config, folder, seed=0):
    """``get_peft_model`` + random (non-zero) adapter weights + ``save_pretrained``; returns the peft model."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.5)
    pm.save_pretrained(str(folder))
    return pm


def _peft_deltas(pm) -> dict[str, torch.Tensor]:
    """{module name: ΔW as the layer's (out × in) linear map} from peft's own ``get_delta_weight``."""
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            d = mod.get_delta_weight("default").detach().double()
            out[name] = d.T if getattr(mod, "fan_in_fan_out", False) else d
    return out


def _assert_same_deltas(lora, pm, rtol=1e-6):
    want = _peft_deltas(pm)
    assert sorted(lora.names) == sorted(want)
    for name, d in want.items():
        got = lora[name].delta().double()
        assert got.shape == d.shape, name
        assert float((got - d).abs().max()) <= rtol * float(d.abs().max()), name


def test_gpt2_sequence_classification_lora_with_score_head(tmp_path, capsys):
    folder = tmp_path / "gpt2_cls"
    cfg = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["c_attn"])
    pm = _save(_gpt2_cls(), cfg, folder)
    lora = read_lora(folder)
    _assert_same_deltas(lora, pm)
    assert dict(lora.full_weight_modules) == {"score.weight": (3, 32)}

    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["full_weight_modules"] == [{"name": "score.weight", "shape": [3, 32]}]
    assert [m["name"] for m in info["modules"]] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert main(["inspect", str(folder)]) == 0
    table = capsys.readouterr().out
    assert "score.weight" in table and "3×32" in table and "full" in table

    # lol predict on the file: the same predictions as for the pairs alone (save_peft writes no full weights)
    ck = _checkpoint(tmp_path, lora)
    stripped = save_peft(lora, tmp_path / "pairs_only")
    assert read_lora(stripped).full_weight_modules == ()
    assert main(["predict", "--checkpoint", str(ck), str(folder), str(stripped), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    a, b = (r["predictions"]["y"] for r in res)
    assert a == pytest.approx(b, rel=1e-6, abs=1e-9)


def _checkpoint(tmp_path, lora):
    """A small GL-net checkpoint over the LoRA's modules, fitted on random LoRAs of that spec."""
    from lol.batch import LoRABatch
    from lol.checkpoint import save_checkpoint
    from lol.models import build_model
    from lol.synth import random_lora
    from lol.targets import Target, TargetSet

    loras = [random_lora(lora.spec, 4, seed=s) for s in range(8)]
    batch = LoRABatch.from_loras(loras, spec=lora.spec)
    model = build_model("glnet", lora.spec, 1).fit(batch)
    targets = TargetSet([Target("y", "regression", mean=0.0, std=1.0)])
    return save_checkpoint(tmp_path / "ck", model, targets)


def test_bert_classifier_and_trained_biases_are_listed(tmp_path):
    folder = tmp_path / "bert_cls"
    cfg = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=16, target_modules=["query", "value"],
                          bias="lora_only")
    pm = _save(_bert_cls(), cfg, folder)
    lora = read_lora(folder)
    _assert_same_deltas(lora, pm)
    full = dict(lora.full_weight_modules)
    assert full["classifier.weight"] == (2, 32) and full["classifier.bias"] == (2,)
    assert full["bert.encoder.layer.0.attention.self.query.base_layer.bias"] == (32,)
    assert len(full) == 2 + 4  # the head, and one bias per adapted layer
    head = read_lora(folder, shapes_only=True)  # the header-only read (`lol import`'s scan) lists them too
    assert dict(head.full_weight_modules) == full


def test_modules_to_save_without_config_entry(tmp_path):
    """A full-weight tensor in the file although the config's modules_to_save is null: read the same way."""
    folder = tmp_path / "plain"
    pm = _save(_bert_cls(1), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"]), folder)
    from safetensors.torch import load_file

    t = load_file(str(folder / "adapter_model.safetensors"))
    t["base_model.model.classifier.weight"] = torch.randn(2, 32)
    save_file(t, str(folder / "adapter_model.safetensors"))
    assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] is None
    lora = read_lora(folder)
    _assert_same_deltas(lora, pm)
    assert lora.full_weight_modules == (("classifier.weight", (2, 32)),)


def test_adalora_is_read_exactly(tmp_path):
    folder = tmp_path / "adalora"
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=["query", "value"], total_step=10)
    pm = _save(_bert_cls(), cfg, folder)
    lora = read_lora(folder)
    assert lora.ranks == [4, 4, 4, 4]
    _assert_same_deltas(lora, pm, rtol=1e-6)


def _refused(capsys, path, *fragments):
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0], err
    for f in fragments:
        assert f in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("kind,make,fragments,by_keys", [
    ("ia3", lambda: peft.IA3Config(target_modules=["query", "value"], feedforward_modules=[]), ("IA3", "(IA)³"),
     "(IA)³"),
    ("loha", lambda: peft.LoHaConfig(r=2, target_modules=["query"]), ("LOHA", "Hadamard"), "LoHa"),
    ("lokr", lambda: peft.LoKrConfig(r=2, target_modules=["query"]), ("LOKR", "Kronecker"), "LoKr"),
    ("vera", lambda: peft.VeraConfig(r=2, target_modules=["query", "value"]), ("VERA", "VeRA"), "VeRA"),
    ("oft", lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["query"]), ("OFT", "orthogonal"), "OFT"),
    ("boft", lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["query"]), ("BOFT", "butterfly"), "BOFT"),
    ("dora", lambda: peft.LoraConfig(r=2, target_modules=["query"], use_dora=True), ("DoRA",), "DoRA"),
])
def test_other_peft_adapter_types_are_named(tmp_path, capsys, kind, make, fragments, by_keys):
    folder = tmp_path / kind
    _save(_bert_cls(1), make(), folder)
    _refused(capsys, folder, *fragments)
    # the weights alone, without the config, are named by their keys (DoRA: lora_magnitude_vector)
    (folder / "adapter_config.json").unlink()
    _refused(capsys, folder / "adapter_model.safetensors", by_keys, "not a plain low-rank")


def test_adalora_weights_without_config_are_named(tmp_path, capsys):
    folder = tmp_path / "adalora"
    _save(_bert_cls(1), peft.AdaLoraConfig(init_r=2, target_r=1, target_modules=["query"], total_step=10), folder)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    _refused(capsys, folder, "AdaLoRA", "lora_E")


def test_community_formats_are_named(tmp_path, capsys):
    r = torch.randn
    cases = {
        # cloneofsimo lora_diffusion (save_safeloras_with_embeds): modules numbered by position, token embeddings
        "clone.safetensors": ({"unet:0:up": r(8, 4), "unet:0:down": r(4, 8), "unet:1:up": r(8, 4),
                               "unet:1:down": r(4, 8)}, ("cloneofsimo", "unet:0")),
        "clone_ti.safetensors": ({"<s1>": r(768)}, ("cloneofsimo", "<s1>")),
        # LyCORIS module types (kohya-style names)
        "loha.safetensors": ({"lora_unet_a_to_q.hada_w1_a": r(8, 2), "lora_unet_a_to_q.hada_w1_b": r(2, 8),
                              "lora_unet_a_to_q.hada_w2_a": r(8, 2), "lora_unet_a_to_q.hada_w2_b": r(2, 8)},
                             ("LoHa", "Hadamard")),
        "lokr.safetensors": ({"lora_unet_a_to_q.lokr_w1": r(2, 2), "lora_unet_a_to_q.lokr_w2": r(4, 4)},
                             ("LoKr", "Kronecker")),
        "locon_tucker.safetensors": ({"lora_unet_a_conv.lora_down.weight": r(2, 4, 1, 1),
                                      "lora_unet_a_conv.lora_mid.weight": r(2, 2, 3, 3),
                                      "lora_unet_a_conv.lora_up.weight": r(8, 2, 1, 1)}, ("Tucker",)),
        "full.safetensors": ({"lora_unet_a_to_q.diff": r(8, 8), "lora_unet_a_to_q.diff_b": r(8)}, ("full module",)),
        "ia3.safetensors": ({"lora_unet_a_to_q.weight": r(8), "lora_unet_a_to_q.on_input": torch.tensor(True)},
                            ("(IA)³",)),
        "glora.safetensors": ({"lora_unet_a_to_q.a1.weight": r(2, 8), "lora_unet_a_to_q.a2.weight": r(8, 2),
                               "lora_unet_a_to_q.b1.weight": r(2, 8), "lora_unet_a_to_q.b2.weight": r(8, 2)},
                              ("GLoRA",)),
        "oft.safetensors": ({"lora_unet_a_to_q.oft_blocks": r(2, 4, 4)}, ("OFT",)),
    }
    for name, (tensors, fragments) in cases.items():
        save_file(tensors, str(tmp_path / name))
        _refused(capsys, tmp_path / name, *fragments)
