"""multilora: K LoRAs trained in one batched pass equal the same LoRAs trained alone; K=1 equals PEFT + AdamW."""
import pytest
import torch

from lol.zoo.multilora import (PerLoRAAdam, accumulation_schedule, inject_multilora, sum_of_means)

torch.set_num_threads(1)


def tiny_qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).double().eval()


def tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=16,
                                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).double().eval()


# --- per-job data, drawn only from the job's own generator --------------------------------------------------------
def lm_batch(gen, bs):
    ids = torch.randint(0, 40, (bs, 6), generator=gen)
    return ids


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    tgt = ids[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                             reduction="none").view(ids.shape[0], -1).mean(1)


def unet_batch(gen, bs):
    x = torch.randn(bs, 4, 8, 8, generator=gen, dtype=torch.float64)
    c = torch.randn(bs, 3, 16, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 1000, (bs,), generator=gen)
    target = torch.randn(bs, 4, 8, 8, generator=gen, dtype=torch.float64)
    return x, c, t, target


def unet_loss(model, batch):
    x, c, t, target = batch
    out = model(x, t, encoder_hidden_states=c).sample
    return ((out - target) ** 2).flatten(1).mean(1)


def cat_batches(parts):
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return tuple(torch.cat(p) for p in zip(*parts))


def train(make_model, targets, jobs, make_batch, loss_fn, loss_mode="sum_of_means"):
    """Train len(jobs) adapters together; each job: seed, lr, wd, steps, accum, bs, dropout."""
    model = make_model()
    K = len(jobs)
    ml = inject_multilora(model, targets, K, rank=4, alpha=8.0, seeds=[j["seed"] for j in jobs],
                          dropout=[j["dropout"] for j in jobs])
    opt = PerLoRAAdam(ml, lr=torch.tensor([j["lr"] for j in jobs]),
                      weight_decay=torch.tensor([j["wd"] for j in jobs]))
    gens = [torch.Generator().manual_seed(1000 + j["seed"]) for j in jobs]
    micro = [j["steps"] * j["accum"] for j in jobs]
    for part, step, w in accumulation_schedule(micro, [j["accum"] for j in jobs]):
        ks = part.nonzero().flatten().tolist()
        batches = [make_batch(gens[k], jobs[k]["bs"]) for k in ks]
        idx = torch.cat([torch.full((jobs[k]["bs"],), k) for k in ks])
        ml.set_index(idx)
        per = loss_fn(model, cat_batches(batches))
        if loss_mode == "sum_of_means":
            loss = sum_of_means(per, idx, K, weight=w)
        else:  # the wrong way: one mean over the whole batch couples the adapters
            loss = per.mean()
        loss.backward()
        opt.step(step)
        opt.zero_grad(step)
    return [ml.export(k, dtype=torch.float64) for k in range(K)], ml, model


JOBS = [
    dict(seed=1, lr=3e-3, wd=1e-2, steps=3, accum=1, bs=2, dropout=0.0),
    dict(seed=2, lr=1e-2, wd=1e-4, steps=2, accum=2, bs=3, dropout=0.1),
    dict(seed=3, lr=1e-3, wd=0.0, steps=4, accum=1, bs=1, dropout=0.05),
]


def assert_same_loras(a, b, atol=1e-9):
    assert a.names == b.names
    for ma, mb in zip(a, b):
        torch.testing.assert_close(ma.U, mb.U, atol=atol, rtol=1e-7)
        torch.testing.assert_close(ma.V, mb.V, atol=atol, rtol=1e-7)


@pytest.mark.parametrize("kind", ["qwen2", "unet"])
def test_batched_training_equals_training_alone(kind):
    if kind == "qwen2":
        args = (tiny_qwen2, ["q_proj", "v_proj"], None, lm_batch, lm_loss)
    else:
        args = (tiny_unet, ["to_q", "to_v"], None, unet_batch, unet_loss)
    make_model, targets, _, make_batch, loss_fn = args
    together, _, _ = train(make_model, targets, JOBS, make_batch, loss_fn)
    for k, job in enumerate(JOBS):
        alone, _, _ = train(make_model, targets, [job], make_batch, loss_fn)
        assert_same_loras(together[k], alone[0])
        # training really moved U away from its zero init
        assert max(float(m.U.abs().max()) for m in alone[0]) > 1e-4
    names = together[0].names
    if kind == "qwen2":
        assert names[0] == "model.layers.0.self_attn.q_proj" and len(names) == 4
    else:
        assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
        assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v" in names


def test_batch_mean_loss_couples_adapters():
    """Sensitivity: with one mean over the batch (not a sum of per-adapter means) the equality above breaks."""
    together, _, _ = train(tiny_qwen2, ["q_proj", "v_proj"], JOBS, lm_batch, lm_loss, loss_mode="batch_mean")
    alone, _, _ = train(tiny_qwen2, ["q_proj", "v_proj"], [JOBS[1]], lm_batch, lm_loss, loss_mode="batch_mean")
    diff = max(float((a.U - b.U).abs().max()) for a, b in zip(together[1], alone[0]))
    assert diff > 1e-6


def test_k1_matches_peft_with_adamw():
    """One adapter trained by MultiLoRA + PerLoRAAdam equals a PEFT LoRA trained by torch.optim.AdamW."""
    from peft import LoraConfig, get_peft_model

    job = dict(seed=5, lr=5e-3, wd=1e-2, steps=4, accum=1, bs=2, dropout=0.0)
    ours, ml, _ = train(tiny_qwen2, ["q_proj", "v_proj"], [job], lm_batch, lm_loss)
    ours = ours[0]
    ref = get_peft_model(tiny_qwen2(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0))
    # same init: A from our seed (B is zero in both)
    fresh = inject_multilora(tiny_qwen2(), ["q_proj", "v_proj"], 1, 4, 8.0, seeds=[5]).export(0, torch.float64)
    for name, mod in ref.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            path = name.removeprefix("base_model.model.")
            mod.lora_A["default"].weight.data.copy_(fresh[path].V.T)
    ref.double()
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=job["lr"],
                            weight_decay=job["wd"])
    gen = torch.Generator().manual_seed(1000 + job["seed"])
    ref.eval()
    for _ in range(job["steps"]):
        ids = lm_batch(gen, job["bs"])
        lm_loss(ref, ids).mean().backward()
        opt.step()
        opt.zero_grad()
    for m in ours:
        peft_mod = ref.get_submodule("base_model.model." + m.name)
        U = peft_mod.lora_B["default"].weight * peft_mod.scaling["default"]
        torch.testing.assert_close(m.U, U.detach(), atol=1e-8, rtol=1e-5)
        torch.testing.assert_close(m.V, peft_mod.lora_A["default"].weight.detach().T, atol=1e-8, rtol=1e-5)
        assert m.scale == pytest.approx(2.0)
        assert float(m.U.abs().max()) > 1e-3  # the adapters trained


def test_index_routing_cfg_tiling_and_remove():
    model = tiny_qwen2()
    ids = torch.randint(0, 40, (2, 5))
    base = model(input_ids=ids).logits
    ml = inject_multilora(model, ["q_proj", "v_proj"], 2, 4, 8.0, seeds=[0, 1])
    with torch.no_grad():
        for layer in ml.layers.values():
            layer.B.normal_()
    ml.eval()
    ml.set_index([-1, -1])
    torch.testing.assert_close(model(input_ids=ids).logits, base)     # -1: base model only
    ml.set_index([0, 1])
    both = model(input_ids=ids).logits
    assert not torch.allclose(both, base)
    ml.set_index([1])
    torch.testing.assert_close(model(input_ids=ids[1:]).logits, both[1:])   # a sample's output: its adapter only
    ml.set_index([0, 1])
    doubled = model(input_ids=torch.cat([ids, ids])).logits                  # CFG-style doubling: idx tiled
    torch.testing.assert_close(doubled[:2], both)
    torch.testing.assert_close(doubled[2:], both)
    ml.set_index([0, 1])
    with pytest.raises(ValueError, match="not a multiple"):
        model(input_ids=ids[:1].repeat(3, 1))
    with pytest.raises(ValueError, match="adapter indices"):
        ml.set_index([2])
    # export: U Vᵀ equals the weight change the layer applies
    lora = ml.export(1, dtype=torch.float64)
    layer = ml.layers["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 32, dtype=torch.float64)
    ml.set_index([1, 1, 1])
    torch.testing.assert_close(layer(x) - layer.base(x), x @ lora["model.layers.0.self_attn.q_proj"].delta().T)
    ml.remove()
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    torch.testing.assert_close(model(input_ids=ids).logits, base)


def test_bad_targets_and_args():
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_multilora(tiny_qwen2(), ["to_q"], 2, 4, 8.0, seeds=[0, 1])
    with pytest.raises(ValueError, match="seeds"):
        inject_multilora(tiny_qwen2(), ["q_proj"], 2, 4, 8.0, seeds=[0])


def test_accumulation_schedule():
    sched = list(accumulation_schedule([2, 4, 3], [1, 2, 3]))
    assert len(sched) == 4
    steps = torch.stack([s for _, s, _ in sched]).int().T.tolist()
    assert steps == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]


def test_dropout_masks_do_not_depend_on_padding_by_batch_mates():
    """With lengths given, adapter 0's dropout on its 3 real tokens is the same alone or padded next to a longer
    sequence of adapter 1; without lengths (sensitivity) the padded length changes the masks."""
    def layer_out(x, idx, lengths):
        lin = torch.nn.Sequential(torch.nn.Linear(8, 8)).double()
        torch.nn.init.zeros_(lin[0].weight)
        torch.nn.init.zeros_(lin[0].bias)
        ml = inject_multilora(lin, ["0"], 2, 4, 8.0, seeds=[3, 4], dropout=0.5)
        with torch.no_grad():
            ml.layers["0"].B.fill_(1.0)
        ml.set_index(idx, lengths=lengths)
        return lin(x)

    x = torch.randn(3, 5, 8, dtype=torch.float64)
    alone = layer_out(x[:2, :3], [0, 0], [3, 2])
    together = layer_out(x, [0, 0, 1], [3, 2, 5])
    torch.testing.assert_close(together[:2, :3], alone)
    unpadded = layer_out(x, [0, 0, 1], None)
    assert not torch.allclose(unpadded[:2, :3], alone)
