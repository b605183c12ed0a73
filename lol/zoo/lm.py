"""The language-model side of the zoo (paper §3, Qwen2-ARC-LoRA) on the synthetic QA world of `lol.zoo.qa`.

* `LMBase` pretrains a tiny ``Qwen2ForCausalLM`` (fixed seed) on all sources of the QA world and saves it, with its
  byte-level Qwen2 tokenizer, by ``save_pretrained``; ``record.json`` holds training time, per-source accuracy and
  challenge accuracy (answer = option of highest log-likelihood). Training stops early enough to leave headroom.
* `LMRecipe`: each job finetunes a rank-4 LoRA on ``q_proj`` and ``v_proj`` on the world's train pools of a random
  subset of sources (each source dropped with probability 1/2), with random lr (log-uniform), weight decay
  (log-uniform), epochs {2, 3, 4}, batch size and LoRA dropout U[0, 0.1]. K jobs train together with
  `lol.zoo.multilora`. Labels: eval loss, challenge accuracy, ``source_<name>`` membership, hyperparameters.

The same code serves a real Qwen2 folder (``--lm-base PATH``): the model and its tokenizer are loaded with
``from_pretrained``; module names are transformers' own (``model.layers.0.self_attn.q_proj``).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np
import torch

from .qa import LEVELS, SOURCES, QAItem, byte_tokenizer, make_split, make_world, prompt_text
from .recipe import Job, JobResult, single_stage, stage_of

__all__ = ["LMBase", "LMRecipe", "LMSiblingBase", "LMSiblingRecipe", "LM_PRESETS", "LM_SIBLING_PRESETS",
           "encode_answers", "encode_options", "answer_nll", "evaluate"]

TARGETS = ("q_proj", "v_proj")

# per preset: model config, pretraining, world sizes and collection size. A job trains for
# round(epochs · epoch_scale · n_train / batch_size) steps (the paper's epochs {2, 3, 4}, rescaled to our budget).
# ``world.n_retest`` > 0 adds the disjoint retest splits (a second challenge set of the same size, a second eval set)
# on which every LoRA is measured a second time: the labels' test–retest reliability (`lol.reliability`).
# Measured on the 2-core build machine, 1 torch thread per process:
#   ci:      base 120 steps ≈ 10 s (quiet) – 3 min (loaded); 8 LoRAs ≈ 4–50 s.
#   default (v1, shipped before Zoo v2): base 1000 steps on standard items only, challenge accuracy 0.27 (chance
#            0.25): LoRAs hardly moved it; 216 challenge questions gave a label noise (0.031) as large as its spread.
#   default (v2): the base also pretrains on challenge-level items (it must be clearly above chance with headroom),
#            1,170 challenge questions (as ARC-C's 1,172) + 1,170 retest questions; lr log-uniform over 2.5 decades.
#            Grown in stages (``stages``: the first 400 LoRAs were shipped first, then the collection grew to the
#            paper's 2,000, as Qwen2-ARC-LoRA): a stage trains in its own groups, so the grown build adopts the LoRAs
#            already packed (`lol.zoo.jobs.adopt_packed`). Only the first stage's every ``retest_every``-th LoRA is
#            measured a second time (``retest_until``): 100 retests give the labels' reliability.
LM_PRESETS: dict[str, dict[str, Any]] = {
    "ci": dict(
        model=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2),
        pretrain=dict(steps=120, batch_size=32, lr=3e-3, warmup=10, challenge_fraction=0.3, pool=1500),
        world=dict(n_train=12, n_eval=2, n_test=3, n_challenge=2, n_retest=1), retest_every=2,
        n_loras=8, lr=(3e-4, 3e-2), weight_decay=(1e-6, 1e-2), epochs=(2, 3, 4), batch_sizes=(4, 8, 16),
        epoch_scale=0.5, dropout=0.1, rank=4, alpha=8.0,
    ),
    "default": dict(
        model=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2),
        pretrain=dict(steps=2000, batch_size=48, lr=2e-3, warmup=100, challenge_fraction=0.35, pool=40000),
        world=dict(n_train=64, n_eval=32, n_test=16, n_challenge=65, n_retest=1), retest_every=4,
        n_loras=2000, stages=(400,), retest_until=400, lr=(1e-4, 3e-2), weight_decay=(1e-6, 1e-2), epochs=(2, 3, 4), batch_sizes=(8, 16, 32),
        epoch_scale=1.0, dropout=0.1, rank=4, alpha=8.0,
    ),
}

# The sibling base ``base/lm_v2`` (as SD-1.5 continues SD-1.4): ``base/lm`` pretrained further (``continue``: steps,
# a fresh pool drawn with other seeds, a new warmup and cosine schedule), and its collection ``lm_v2``: the lm recipe's
# LoRA distribution with its own draws (``n_loras``), every label measured once (no retest). ``pretrain`` has the
# parent's keys; its pool comes from other seeds than the parent's (``pool_stream``), never a held-out question.
# Measured on the 2-core build machine, 1 torch thread per process: default continuation 1,000 steps ≈ 500 s.
LM_SIBLING_PRESETS: dict[str, dict[str, Any]] = {
    "ci": dict(pretrain=dict(steps=20, batch_size=32, lr=1e-3, warmup=5, challenge_fraction=0.3, pool=800),
               pool_stream=1, n_loras=4),
    "default": dict(pretrain=dict(steps=1000, batch_size=48, lr=1e-3, warmup=50, challenge_fraction=0.35,
                                  pool=20000), pool_stream=1, n_loras=300),
}


def _preset(preset: str) -> dict[str, Any]:
    if preset not in LM_PRESETS:
        raise KeyError(f"unknown preset {preset!r} for the lm zoo; known: {', '.join(LM_PRESETS)}")
    return LM_PRESETS[preset]


# --- encoding and scoring (any causal LM + tokenizer) -------------------------------------------------------------
def _ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _pad(seqs: list[list[int]], masks: list[list[int]], pad_id: int):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, mask


def encode_answers(items: Sequence[QAItem], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of ``prompt + " " + answer + eos`` and a mask marking the answer and eos tokens (the loss)."""
    P = _ids(tokenizer, [prompt_text(it) for it in items])
    C = _ids(tokenizer, [" " + it.answer_text for it in items])
    eos = tokenizer.eos_token_id
    seqs = [p + c + [eos] for p, c in zip(P, C)]
    masks = [[0] * len(p) + [1] * (len(c) + 1) for p, c in zip(P, C)]
    return seqs, masks


def encode_options(items: Sequence[QAItem], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """For each item, 4 sequences ``prompt + " " + option`` (item-major) and masks marking the option tokens."""
    P = _ids(tokenizer, [prompt_text(it) for it in items])
    C = _ids(tokenizer, [" " + c for it in items for c in it.choices])
    seqs, masks = [], []
    for i, p in enumerate(P):
        for j in range(4):
            c = C[4 * i + j]
            seqs.append(p + c)
            masks.append([0] * len(p) + [1] * len(c))
    return seqs, masks


def _token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) sum over masked positions of log p(token | prefix). Right padding: no attention mask is needed."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (lp * mask[:, 1:]).sum(1)


def _batched(model, multilora, seqs, masks, pad_id, device, n_adapters: int, chunk_tokens: int):
    """Run every sequence under every adapter (or the bare model when ``multilora`` is None) in chunks; returns
    (K, N) summed log-probs over masked tokens and (N,) masked-token counts."""
    K = n_adapters
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.zeros(K, len(seqs), dtype=torch.float64)
    i = 0
    while i < len(order):
        T = len(seqs[order[min(len(order) - 1, i)]])
        n = max(1, chunk_tokens // (K * max(T, 1)))
        sel = order[i: i + n]
        ids, mask = _pad([seqs[j] for j in sel], [masks[j] for j in sel], pad_id)
        ids, mask = ids.repeat(K, 1).to(device), mask.repeat(K, 1).to(device)
        if multilora is not None:
            multilora.set_index(torch.arange(K).repeat_interleave(len(sel)))
        with torch.no_grad():
            lp = _token_logprobs(model, ids, mask).double().cpu().view(K, len(sel))
        out[:, sel] = lp
        i += n
    counts = torch.tensor([sum(m) for m in masks], dtype=torch.float64)
    return out, counts


def evaluate(model, tokenizer, items_eval: Sequence[QAItem], items_mc: Sequence[QAItem], device="cpu",
             multilora=None, n_adapters: int = 1, chunk_tokens: int = 16384) -> dict[str, torch.Tensor]:
    """Per adapter: ``eval_loss`` (mean answer-token NLL on ``items_eval``) and ``correct`` (K, len(items_mc)):
    whether the option of highest summed log-likelihood is the answer."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was = None
    if multilora is not None:
        was = multilora.training
        multilora.eval()
    res = {}
    if items_eval:
        s, m = encode_answers(items_eval, tokenizer)
        lp, cnt = _batched(model, multilora, s, m, pad, device, n_adapters, chunk_tokens)
        res["eval_loss"] = -(lp.sum(1) / cnt.sum())
    if items_mc:
        s, m = encode_options(items_mc, tokenizer)
        lp, _ = _batched(model, multilora, s, m, pad, device, n_adapters, chunk_tokens)
        pred = lp.view(n_adapters, len(items_mc), 4).argmax(-1)
        ans = torch.tensor([it.answer_index for it in items_mc])
        res["correct"] = pred == ans
    if multilora is not None:
        multilora.set_index(None)
        multilora.train(was)
    return res


def answer_nll(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) mean NLL over each sequence's answer tokens (the finetuning loss)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].to(nll.dtype)
    return (nll * m).sum(1) / m.sum(1).clamp(min=1)


def _per_source(items: Sequence[QAItem], correct: torch.Tensor) -> dict[str, float]:
    out: dict[str, list[bool]] = {}
    for it, c in zip(items, correct.tolist()):
        out.setdefault(it.source, []).append(bool(c))
    return {s: float(np.mean(v)) for s, v in out.items()}


@lru_cache(maxsize=4)
def _world(seed: int, n_train: int, n_eval: int, n_test: int, n_challenge: int, n_retest: int = 0):
    return make_world(seed, n_train, n_eval, n_test, n_challenge, n_retest)


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


# --- the base model -----------------------------------------------------------------------------------------------
class LMBase:
    """Pretrain a tiny Qwen2 causal LM on the QA world and save it (model + tokenizer + world.json + record.json,
    written last into a temp folder renamed into place). ``LMBase(pretrained=PATH)`` instead records a real local
    causal-LM folder (e.g. Qwen2) after checking that it loads."""

    name = "lm"
    requires: tuple[str, ...] = ()

    def __init__(self, pretrained: str | Path | None = None):
        self.pretrained = pretrained

    def is_built(self, out_dir: Path) -> bool:
        return (Path(out_dir) / "record.json").is_file()

    def build(self, preset: str, out_dir: Path, device: str | None = None, seed: int = 0) -> dict[str, Any]:
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if self.pretrained is not None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            src = Path(self.pretrained).resolve()
            t0 = time.time()
            AutoTokenizer.from_pretrained(src)
            model = AutoModelForCausalLM.from_pretrained(src)
            record = {"kind": "lm", "pretrained": str(src), "architecture": type(model).__name__,
                      "n_parameters": int(sum(p.numel() for p in model.parameters())),
                      "load_seconds": round(time.time() - t0, 2)}
        else:
            record = self._train(preset, tmp, _device(device), seed)
        (tmp / "record.json").write_text(json.dumps(record, indent=2, default=float))  # the completion marker
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        return record

    def _train(self, preset: str, out_dir: Path, device: str, seed: int) -> dict[str, Any]:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        P = _preset(preset)
        t0 = time.time()
        tok = byte_tokenizer()
        world_cfg = dict(seed=int(seed), **P["world"])
        world = _world(**world_cfg)
        pool = _pretrain_pool(world, P["pretrain"], seed, stream=0)
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                          **P["model"])
        model = Qwen2ForCausalLM(cfg).to(device)
        losses = _pretrain(model, tok, pool, P["pretrain"], seed, device)
        train_s = time.time() - t0
        return {"kind": "lm", "architecture": "Qwen2ForCausalLM", "config": P["model"], "vocab_size": len(tok),
                "n_parameters": int(sum(p.numel() for p in model.parameters())),
                "seed": int(seed), "preset": preset, "device": device, "train_seconds": round(train_s, 1),
                "pretrain": {**P["pretrain"], "pool_size": len(pool), "loss_first": float(np.mean(losses[:10])),
                             "loss_last": float(np.mean(losses[-10:]))},
                **_save_and_measure(model, tok, world, world_cfg, out_dir, device)}


def _pretrain_pool(world: dict[str, list[QAItem]], pc: dict[str, Any], seed: int, stream: int) -> list[QAItem]:
    """The pretraining items: ``pc["pool"]`` in all, a ``challenge_fraction`` of them at the challenge level, none of
    them a question of any split of the world (held-out or finetuning). ``stream`` 0 is the base's pool; another
    stream draws another pool (a sibling base's further pretraining: more data)."""
    held = {it.question for k in world for it in world[k]}
    n_ch = int(pc["pool"] * pc["challenge_fraction"]) // len(SOURCES)
    n_st = (pc["pool"] - n_ch * len(SOURCES)) // len(SOURCES)
    off = 100 * int(stream)
    pool = make_split(n_st, "standard", seed * 8 + 7 + off, exclude=held)
    if n_ch:
        pool += make_split(n_ch, "challenge", seed * 8 + 8 + off, exclude=held)
    return pool


def _pretrain(model, tok, pool: list[QAItem], pc: dict[str, Any], seed: int, device: str) -> list[float]:
    """``pc["steps"]`` AdamW steps (weight decay 0.01, linear warmup then cosine decay to 0, gradient clipping 1) on
    random batches of the pool's answer tokens; returns the losses. Leaves the model in eval mode."""
    seqs, masks = encode_answers(pool, tok)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=pc["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / pc["warmup"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / pc["steps"]))))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _step in range(pc["steps"]):
        sel = torch.randint(0, len(seqs), (pc["batch_size"],), generator=gen).tolist()
        ids, mask = _pad([seqs[i] for i in sel], [masks[i] for i in sel], tok.pad_token_id)
        loss = answer_nll(model, ids.to(device), mask.to(device)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _save_and_measure(model, tok, world, world_cfg: dict, out_dir: Path, device: str) -> dict[str, Any]:
    """Save model, tokenizer and ``world.json`` into ``out_dir``; return the record's quality figures (eval loss,
    per-source test accuracy, challenge accuracy and their retest measurements)."""
    ev = evaluate(model, tok, world["eval"], world["test"], device)
    ch = evaluate(model, tok, [], world["challenge"], device)
    rt = evaluate(model, tok, world.get("eval_retest", []), world.get("challenge_retest", []), device)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "world.json").write_text(json.dumps({"world": world_cfg, "sources": list(SOURCES),
                                                    "levels": list(LEVELS)}, indent=1))
    return {
        "world": world_cfg,
        "eval_loss": float(ev["eval_loss"][0]),
        "test_accuracy": float(ev["correct"].float().mean()),
        "test_accuracy_per_source": _per_source(world["test"], ev["correct"][0]),
        "challenge_accuracy": float(ch["correct"].float().mean()),
        "challenge_accuracy_per_source": _per_source(world["challenge"], ch["correct"][0]),
        "chance_accuracy": 0.25,
        **({"challenge_accuracy_retest": float(rt["correct"].float().mean())} if "correct" in rt else {}),
        **({"eval_loss_retest": float(rt["eval_loss"][0])} if "eval_loss" in rt else {}),
        "n_challenge_questions": len(world["challenge"]), "n_eval_items": len(world["eval"]),
    }


class LMSiblingBase(LMBase):
    """The sibling language model ``base/lm_v2``: ``base/lm`` pretrained further on a fresh pool
    (`LM_SIBLING_PRESETS`), as SD-1.5 continues SD-1.4 — same architecture and module shapes, other weights.
    ``LMSiblingBase(pretrained=PATH)`` records a real local causal-LM folder instead (`LMBase`)."""

    name = "lm_v2"
    requires: tuple[str, ...] = ("lm",)

    def _train(self, preset: str, out_dir: Path, device: str, seed: int) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        from .image_bases import resolve_base

        if preset not in LM_SIBLING_PRESETS:
            raise KeyError(f"unknown preset {preset!r} for the lm sibling base; known: {', '.join(LM_SIBLING_PRESETS)}")
        S = LM_SIBLING_PRESETS[preset]
        parent_dir = out_dir.parent / "lm"   # out_dir is base/lm_v2's temporary sibling
        rec_path = parent_dir / "record.json"
        if not rec_path.is_file():
            raise FileNotFoundError(f"LMSiblingBase continues the base LM: {rec_path} not found; build 'lm' first")
        parent = json.loads(rec_path.read_text())
        if parent.get("pretrained"):
            raise ValueError(f"{parent_dir} is a linked model ({parent['pretrained']}); pass the sibling's folder as "
                             f"well (--lm-sibling-base PATH) instead of training one here")
        world_cfg = parent["world"]
        world = _world(**world_cfg)
        t0 = time.time()
        tok = byte_tokenizer()
        model = AutoModelForCausalLM.from_pretrained(resolve_base(parent_dir), dtype=torch.float32).to(device)
        pool = _pretrain_pool(world, S["pretrain"], int(world_cfg["seed"]), stream=S["pool_stream"])
        torch.manual_seed(seed + 1)
        losses = _pretrain(model, tok, pool, S["pretrain"], seed + 1, device)
        train_s = time.time() - t0
        return {"kind": "lm", "architecture": type(model).__name__, "config": parent["config"],
                "vocab_size": len(tok), "n_parameters": int(sum(p.numel() for p in model.parameters())),
                "seed": int(seed), "preset": preset, "device": device, "stage": 2, "parent": "base/lm",
                "train_seconds": round(train_s, 1),
                "pretrain": {**S["pretrain"], "pool_stream": S["pool_stream"], "pool_size": len(pool),
                             "loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))},
                **_save_and_measure(model, tok, world, world_cfg, out_dir, device)}


# --- the collection -----------------------------------------------------------------------------------------------
class LMRecipe:
    """Rank-4 q/v LoRAs of the LM, each finetuned on a random subset of the QA world's sources."""

    name = "lm"
    requires: tuple[str, ...] = ("lm",)
    unrecorded = ("epoch_scale", "retest", "stage")   # job settings its rows do not record (`CollectionRecipe`)
    base = "lm"                      # the base model the LoRAs finetune
    stream = 7                       # random stream of the jobs' draws (sources, hyperparameters)

    def preset(self, preset: str) -> dict[str, Any]:
        return _preset(preset)

    def jobs(self, preset: str, seed: int) -> list[Job]:
        P = self.preset(preset)
        names = list(SOURCES)
        out = []
        for i in range(P["n_loras"]):
            rng = np.random.default_rng([int(seed), self.stream, i])
            keep = rng.random(len(names)) < 0.5
            while keep.sum() < 2:
                keep[int(rng.integers(0, len(names)))] = True
            lo, hi = P["lr"]
            wlo, whi = P["weight_decay"]
            params = {
                "sources": [n for n, k in zip(names, keep) if k],
                "dropped": [n for n, k in zip(names, keep) if not k],
                "lr": float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
                "weight_decay": float(math.exp(rng.uniform(math.log(wlo), math.log(whi)))),
                "epochs": int(rng.choice(P["epochs"])),
                "batch_size": int(rng.choice(P["batch_sizes"])),
                "dropout": float(rng.uniform(0.0, P["dropout"])),
                "epoch_scale": P["epoch_scale"], "rank": P["rank"], "alpha": P["alpha"],
                "world": dict(seed=int(seed), **P["world"]),
                "retest": bool(P["world"].get("n_retest") and P.get("retest_every", 1)
                               and i % P.get("retest_every", 1) == 0 and i < P.get("retest_until", math.inf)),
            }
            if P.get("stages"):  # which stage of a grown collection the job belongs to (`make_manifest`)
                params["stage"] = stage_of(i, P)
            out.append(Job(id=f"{self.name}-{i:05d}", seed=int(seed) * 100003 + i, params=params))
        return out

    def group_key(self, job: Job) -> Hashable:
        # jobs measured a second time (retest) train together: the retest sets are evaluated for their groups only
        return (job.params["rank"], job.params["alpha"], json.dumps(job.params["world"], sort_keys=True),
                bool(job.params.get("retest")))

    def label_schema(self) -> dict[str, dict[str, Any]]:
        schema = {
            "challenge_accuracy": {"kind": "regression", "task": "challenge_accuracy", "retest":
                                   "challenge_accuracy_retest",
                                   "description": "accuracy on the held-out harder split (4 options, max "
                                                  "log-likelihood); retest: a disjoint challenge set of the same "
                                                  "size"},
            "eval_loss": {"kind": "regression", "task": "eval_loss", "retest": "eval_loss_retest",
                          "description": "mean answer-token NLL on the eval split (half standard, half challenge "
                                         "items); retest: a disjoint eval set of the same size"},
        }
        for s in SOURCES:
            schema[f"source_{s}"] = {"kind": "binary", "task": "membership", "exact": True,
                                     "description": f"1 if source {s!r} was in the finetuning set"}
        return schema

    def tasks(self) -> dict[str, list[str]]:
        return {"challenge_accuracy": ["challenge_accuracy"], "eval_loss": ["eval_loss"],
                "membership": [f"source_{s}" for s in SOURCES]}

    def run_group(self, jobs: list[Job], bases: dict[str, Path], device: str) -> list[JobResult]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .multilora import PerLoRAAdam, accumulation_schedule, inject_multilora, sum_of_means

        device = _device(device)
        p0 = jobs[0].params
        for j in jobs[1:]:
            if self.group_key(j) != self.group_key(jobs[0]):
                raise ValueError(f"job {j.id} cannot share a group with {jobs[0].id} (different rank/alpha/world)")
        from .image_bases import resolve_base

        base = resolve_base(bases[self.base])
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device).eval()
        world = _world(**p0["world"])
        train_items = world["train"]
        K = len(jobs)
        ml = inject_multilora(model, list(TARGETS), K, rank=p0["rank"], alpha=p0["alpha"],
                              seeds=[j.seed for j in jobs], dropout=[j.params["dropout"] for j in jobs])
        opt = PerLoRAAdam(ml, lr=torch.tensor([j.params["lr"] for j in jobs]),
                          weight_decay=torch.tensor([j.params["weight_decay"] for j in jobs]))
        seqs, masks = encode_answers(train_items, tok)
        plans = []
        for j in jobs:  # each job's data order comes from its own generator only
            pool = [i for i, it in enumerate(train_items) if it.source in set(j.params["sources"])]
            bs = j.params["batch_size"]
            steps = max(1, round(j.params["epochs"] * j.params["epoch_scale"] * len(pool) / bs))
            gen = torch.Generator().manual_seed(j.seed)
            order: list[int] = []
            while len(order) < steps * bs:
                order += [pool[i] for i in torch.randperm(len(pool), generator=gen).tolist()]
            plans.append(dict(order=order[: steps * bs], bs=bs, steps=steps, n_train=len(pool)))
        t0 = time.time()
        ml.train()
        for t, (part, step, _w) in enumerate(accumulation_schedule([p["steps"] for p in plans], [1] * K)):
            ks = part.nonzero().flatten().tolist()
            rows = [i for k in ks for i in plans[k]["order"][t * plans[k]["bs"]: (t + 1) * plans[k]["bs"]]]
            idx = torch.cat([torch.full((plans[k]["bs"],), k) for k in ks])
            ids, mask = _pad([seqs[i] for i in rows], [masks[i] for i in rows], tok.pad_token_id)
            ml.set_index(idx, lengths=[len(seqs[i]) for i in rows])
            per = answer_nll(model, ids.to(device), mask.to(device))
            sum_of_means(per, idx.to(device), K).backward()
            opt.step(step)
            opt.zero_grad(step)
        train_s = time.time() - t0
        ev = evaluate(model, tok, world["eval"], world["challenge"], device, multilora=ml, n_adapters=K)
        rt = (evaluate(model, tok, world.get("eval_retest", []), world.get("challenge_retest", []), device,
                       multilora=ml, n_adapters=K) if p0.get("retest") else {})
        eval_s = time.time() - t0 - train_s
        results = []
        for k, j in enumerate(jobs):
            row = {"id": j.id, "group": "src-" + "".join("1" if s in j.params["sources"] else "0" for s in SOURCES),
                   "challenge_accuracy": float(ev["correct"][k].float().mean()),
                   "eval_loss": float(ev["eval_loss"][k])}
            row["challenge_accuracy_retest"] = (float(rt["correct"][k].float().mean()) if "correct" in rt
                                                else float("nan"))
            row["eval_loss_retest"] = float(rt["eval_loss"][k]) if "eval_loss" in rt else float("nan")
            row.update({f"source_{s}": int(s in j.params["sources"]) for s in SOURCES})
            row.update({"lr": j.params["lr"], "weight_decay": j.params["weight_decay"], "epochs": j.params["epochs"],
                        "batch_size": j.params["batch_size"], "dropout": j.params["dropout"],
                        "n_sources": len(j.params["sources"]), "n_train": plans[k]["n_train"],
                        "steps": plans[k]["steps"], "rank": j.params["rank"], "alpha": j.params["alpha"],
                        "seed": j.seed})
            per_src = _per_source(world["challenge"], ev["correct"][k])
            results.append(JobResult(j.id, ml.export(k), row,
                                     extras={"challenge_accuracy_per_source": per_src,
                                             "group_train_seconds": round(train_s, 2),
                                             "group_eval_seconds": round(eval_s, 2), "group_size": K}))
        ml.remove()
        return results


class LMSiblingRecipe(LMRecipe):
    """The lm collection's twin on the sibling base ``base/lm_v2`` (`LM_SIBLING_PRESETS`): the same LoRA distribution
    (sources, hyperparameters) with its own draws and ids, every label measured once. LoL models trained on one
    base's LoRAs are tested on the other's (notebook 08; the paper's transfer across base models)."""

    name = "lm_v2"
    requires: tuple[str, ...] = ("lm_v2",)
    base = "lm_v2"
    base_roles = {"lm_v2": "lm"}     # recorded as the collection's "lm": the model it finetunes
    stream = 0x1A2

    def preset(self, preset: str) -> dict[str, Any]:
        if preset not in LM_SIBLING_PRESETS:
            raise KeyError(f"unknown preset {preset!r} for the lm_v2 zoo; known: {', '.join(LM_SIBLING_PRESETS)}")
        P = single_stage(_preset(preset))
        return {**P, "n_loras": LM_SIBLING_PRESETS[preset]["n_loras"], "retest_every": 0}

    def label_schema(self) -> dict[str, dict[str, Any]]:
        """The lm labels, without the retest measurements (the reliability figures are the main collection's)."""
        return {k: {f: (v.split("; retest:")[0] if f == "description" else v) for f, v in d.items() if f != "retest"}
                for k, d in super().label_schema().items()}
