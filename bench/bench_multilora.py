"""K LoRAs trained in one batched pass (`lol.zoo.multilora`) vs one LoRA at a time with PEFT, same jobs, same run.

Jobs: K LoRAs (rank 4, ``to_q``/``to_v``) of a tiny ``UNet2DConditionModel`` (channels (32, 64), one layer per
block, cross-attention dim 64) on 16×16×4 latents, each ``--steps`` AdamW steps of B samples (ε-prediction MSE on
random data drawn from the job's own generator). Reports LoRA-steps per second of both and their ratio (goal ≥ 3×)
for each K×B configuration. Batching saves per-call overhead (Python, kernel launches, optimizer), so the gain is
largest for small per-LoRA batches. Run: ``python -m bench multilora [-- --configs 8x4,16x1 --steps 5]``.

Measured on the shared 2-core CPU machine (1 thread, other jobs running): 8×4: 5.3 vs 6.0 LoRA-steps/s (1.14×);
16×1: 12.7 vs 23.4 LoRA-steps/s (1.85×). The 3× goal is not reached on CPU: one K = 16 batched pass over 16 samples
costs what one PEFT pass over 16 samples costs (521 vs 548 ms), so the per-sample adapters add no overhead, but the
UNet is compute-bound (≈ 32 ms per sample vs 35 ms for a whole batch-1 step): batching can only remove the per-step
overhead. On a GPU, where a small step leaves the device idle, it does: one H200, ``--device cuda --steps 10``:
8×4 3.3×, 16×1 9.2×, 32×1 15.8×, 64×1 30.3× (results/gpu/README.md).
"""
from __future__ import annotations

import argparse
import time

import torch


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=32, cross_attention_dim=64,
                                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


DEVICE = torch.device("cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def job_batch(gen, bs):
    x = torch.randn(bs, 4, 16, 16, generator=gen)
    c = torch.randn(bs, 8, 64, generator=gen)
    t = torch.randint(0, 1000, (bs,), generator=gen)
    eps = torch.randn(bs, 4, 16, 16, generator=gen)
    return tuple(v.to(DEVICE) for v in (x, c, t, eps))


def run_peft(K, steps, bs) -> tuple[float, float]:
    """One LoRA at a time: a PEFT adapter on the UNet, torch AdamW, `steps` steps; returns (training, setup) s."""
    from peft import LoraConfig, get_peft_model

    total = setup = 0.0
    for k in range(K):
        t0 = time.perf_counter()
        model = get_peft_model(tiny_unet(), LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
        model.to(DEVICE)
        _sync()
        setup += time.perf_counter() - t0
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        gen = torch.Generator().manual_seed(k)
        t0 = time.perf_counter()
        for _ in range(steps):
            x, c, t, eps = job_batch(gen, bs)
            loss = ((model(x, t, encoder_hidden_states=c).sample - eps) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync()
        total += time.perf_counter() - t0
    return total, setup


def run_multilora(K, steps, bs) -> tuple[float, float]:
    """All K LoRAs in one batched pass per step (sum of per-LoRA mean losses); returns (training, setup) s."""
    from lol.zoo.multilora import PerLoRAAdam, inject_multilora, sum_of_means

    t0 = time.perf_counter()
    model = tiny_unet().to(DEVICE)
    ml = inject_multilora(model, ["to_q", "to_v"], K, rank=4, alpha=4.0, seeds=list(range(K)))
    _sync()
    setup = time.perf_counter() - t0
    opt = PerLoRAAdam(ml, lr=torch.full((K,), 1e-3), weight_decay=torch.full((K,), 1e-2))
    gens = [torch.Generator().manual_seed(k) for k in range(K)]
    idx = torch.arange(K).repeat_interleave(bs).to(DEVICE)
    ml.set_index(idx)
    _sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        parts = [job_batch(g, bs) for g in gens]
        x, c, t, eps = (torch.cat(p) for p in zip(*parts))
        per = ((model(x, t, encoder_hidden_states=c).sample - eps) ** 2).flatten(1).mean(1)
        sum_of_means(per, idx, K).backward()
        opt.step()
        opt.zero_grad()
    _sync()
    return time.perf_counter() - t0, setup


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="bench multilora")
    ap.add_argument("--configs", default="8x4,16x1",
                    help="comma list of KxB: K LoRAs (jobs) of B samples per step each")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per LoRA")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv or [])
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    run_multilora(2, 1, 2)  # warm-up (imports, allocator)
    run_peft(1, 1, 2)
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"{args.threads} CPU thread(s)"
    print(f"tiny UNet 16×16×4, rank 4 on to_q/to_v, {args.steps} AdamW steps per LoRA, on {where}")
    print(f"{'K':>4} {'B':>3} | {'PEFT one at a time':>30} | {'multilora K-batched':>30} | speed-up  | incl. setup")
    out = []
    for cfg in args.configs.split(","):
        K, B = (int(v) for v in cfg.lower().split("x"))
        S = args.steps
        t_peft, s_peft = run_peft(K, S, B)
        t_multi, s_multi = run_multilora(K, S, B)
        r = {"K": K, "batch": B, "steps": S, "threads": args.threads,
             "peft_lora_steps_per_s": K * S / t_peft, "multilora_lora_steps_per_s": K * S / t_multi,
             "peft_setup_s": s_peft, "multilora_setup_s": s_multi}
        r["speedup"] = r["multilora_lora_steps_per_s"] / r["peft_lora_steps_per_s"]
        r["speedup_with_setup"] = (t_peft + s_peft) / (t_multi + s_multi)
        out.append(r)
        print(f"{K:>4} {B:>3} | {r['peft_lora_steps_per_s']:6.2f} LoRA-steps/s ({1000 * t_peft / (K * S):5.0f} ms) | "
              f"{r['multilora_lora_steps_per_s']:6.2f} LoRA-steps/s ({1000 * t_multi / (K * S):5.0f} ms) | "
              f"{r['speedup']:6.2f}×  | {r['speedup_with_setup']:6.2f}×", flush=True)
    print("speed-up: training loops only (goal ≥ 3×); incl. setup: plus building the model and adapters per run")
    return out


if __name__ == "__main__":
    main()
