"""Train K independent LoRAs in one batched forward/backward pass.

Every targeted ``nn.Linear`` (frozen weight W) is wrapped so that sample i of a batch sees its own adapter
``k = idx[i]``::

    y_i = W x_i + s · B_k A_k dropout_k(x_i)        (s = alpha / r;  idx[i] = -1: no adapter)

with ``A`` stacked as (K, r, in) and ``B`` as (K, out, r). Initialisation follows PEFT: ``A_k`` kaiming-uniform
(a = √5, i.e. U(-1/√in, 1/√in)) drawn from adapter k's own seed, ``B_k = 0``. Exported in LoL notation
``U = s·B_k``, ``V = A_kᵀ`` (so ``ΔW = U Vᵀ``).

Independence: adapter k's parameters receive gradient only from the samples with ``idx == k``; `PerLoRAAdam` keeps
per-adapter learning rate, weight decay and step count and updates only the adapters marked active; dropout masks of
adapter k come from its own generator. Adapter k's result therefore depends only on its own seed, data and
hyperparameters, and a K-batched run equals K single runs within float tolerance — provided the pass loss is the
*sum* over adapters of each adapter's own mean loss (`sum_of_means`), never a mean over the whole batch.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ..lora import LoRA, LoRAModule

__all__ = ["MultiLoRALinear", "MultiLoRA", "inject_multilora", "PerLoRAAdam", "sum_of_means", "accumulation_schedule"]

_DROPOUT_SEED_OFFSET = 0x5EED  # dropout generator of adapter k: seed_k + offset (init uses seed_k itself)


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus K LoRA adapters; which adapter each sample uses is set by `MultiLoRA.set_index`."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, scale: float, path: str, owner: "MultiLoRA"):
        super().__init__()
        self.base = base
        K, r, _ = A.shape
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(torch.zeros(K, base.out_features, r, dtype=A.dtype, device=A.device))
        self.scale = float(scale)
        self.path = path
        self._owner = [owner]  # a list so nn.Module does not register the owner as a child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        owner = self._owner[0]
        idx = owner.index
        if idx is None:
            return y
        n = idx.shape[0]
        if x.shape[0] % n:
            raise ValueError(f"{self.path}: batch of {x.shape[0]} samples is not a multiple of the "
                             f"{n} adapter indices given to set_index")
        m = x.shape[0] // n
        if m > 1:  # e.g. classifier-free guidance: [uncond; cond] of the same samples
            idx = idx.repeat(m)
        idx = idx.to(x.device)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        x3 = owner._dropout(x3, idx)
        use = idx >= 0
        safe = idx.clamp(min=0)
        A = self.A[safe].to(x3.dtype)                      # (N, r, in)
        B = self.B[safe].to(x3.dtype)                      # (N, out, r)
        h = torch.bmm(x3, A.transpose(1, 2))               # (N, T, r)
        d = torch.bmm(h, B.transpose(1, 2)) * self.scale   # (N, T, out)
        if not bool(use.all()):
            d = d * use.to(d.dtype)[:, None, None]
        return y + d.reshape(y.shape)


class MultiLoRA:
    """K LoRA adapters injected into one frozen model (see `inject_multilora`)."""

    def __init__(self, model: nn.Module, layers: dict[str, MultiLoRALinear], parents: dict[str, tuple],
                 n_adapters: int, rank: int, alpha: float, seeds: list[int], dropout: torch.Tensor,
                 name_prefix: str):
        self.model = model
        self.layers = layers
        self._parents = parents
        self.n_adapters = n_adapters
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.seeds = list(seeds)
        self.dropout = dropout
        self.name_prefix = name_prefix
        self.index: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None
        self.training = True
        self._gens: list[torch.Generator | None] = [None] * n_adapters
        self._gen_device: torch.device | None = None

    # -- which adapter each sample uses ------------------------------------------------------------------------------
    def set_index(self, idx: torch.Tensor | Sequence[int] | None, lengths: torch.Tensor | Sequence[int] | None = None
                  ) -> None:
        """``idx[i]`` is the adapter of sample i (-1: base model only); None switches all adapters off.

        ``lengths[i]`` (optional) is the number of real (unpadded) positions of sample i. Give it when sequences of
        several adapters are right-padded to one length: adapter k's dropout masks are then drawn for its own
        longest sequence only, so they do not depend on which other adapters share the batch.
        """
        self.lengths = None
        if idx is None:
            self.index = None
            return
        if lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.long)
            if lengths.shape != (len(idx),):
                raise ValueError(f"set_index: lengths must have shape ({len(idx)},), got {tuple(lengths.shape)}")
            self.lengths = lengths
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.ndim != 1:
            raise ValueError(f"set_index: idx must be 1-D (batch,), got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.max()) >= self.n_adapters or int(idx.min()) < -1):
            raise ValueError(f"set_index: adapter indices must lie in [-1, {self.n_adapters - 1}], got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        self.index = idx

    def train(self, mode: bool = True) -> "MultiLoRA":
        """LoRA dropout is active only in training mode (the base model's own mode is left alone)."""
        self.training = mode
        return self

    def eval(self) -> "MultiLoRA":
        return self.train(False)

    def _dropout(self, x3: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if not self.training or not bool((self.dropout > 0).any()):
            return x3
        keep = torch.ones_like(x3)
        lengths = None
        if self.lengths is not None and x3.shape[1] >= int(self.lengths.max()):
            lengths = self.lengths.repeat(x3.shape[0] // self.lengths.shape[0])
        for k in torch.unique(idx[idx >= 0]).tolist():
            p = float(self.dropout[k])
            if p <= 0:
                continue
            rows = (idx == k).nonzero().flatten()
            T = x3.shape[1] if lengths is None else int(lengths[rows.cpu()].max())
            g = self._generator(k, x3.device)
            mask = (torch.rand((rows.numel(), T, x3.shape[2]), generator=g, device=x3.device,
                               dtype=torch.float32) >= p).to(x3.dtype) / (1.0 - p)
            keep[rows, :T] = mask
        return x3 * keep

    def _generator(self, k: int, device: torch.device) -> torch.Generator:
        if self._gen_device is not None and self._gen_device != device:
            raise RuntimeError("MultiLoRA: dropout generators were created on another device")
        if self._gens[k] is None:
            self._gen_device = device
            self._gens[k] = torch.Generator(device=device).manual_seed(int(self.seeds[k]) + _DROPOUT_SEED_OFFSET)
        return self._gens[k]

    # -- parameters and results -------------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """All trainable tensors: per layer A (K, r, in) then B (K, out, r)."""
        out = []
        for layer in self.layers.values():
            out += [layer.A, layer.B]
        return out

    def export(self, k: int, dtype: torch.dtype = torch.float32) -> LoRA:
        """Adapter k as a `lol.LoRA`: module ``name_prefix + path``, ``U = s·B_k``, ``V = A_kᵀ``."""
        if not 0 <= k < self.n_adapters:
            raise IndexError(f"adapter {k} out of range [0, {self.n_adapters})")
        mods = []
        with torch.no_grad():
            for path, layer in self.layers.items():
                U = (layer.B[k].double() * self.scale).to(dtype).cpu().contiguous()
                V = layer.A[k].T.to(dtype).cpu().contiguous()
                mods.append(LoRAModule(self.name_prefix + path, U, V, alpha=self.alpha, scale=self.scale))
        return LoRA.from_modules(mods, format="multilora",
                                 config={"r": self.rank, "lora_alpha": self.alpha, "seed": int(self.seeds[k])})

    def remove(self) -> nn.Module:
        """Put the original linear layers back; returns the model."""
        for path, layer in self.layers.items():
            parent, attr = self._parents[path]
            setattr(parent, attr, layer.base)
        self.layers = {}
        self.index = None
        return self.model


def _matcher(target) -> Callable[[str, nn.Module], bool]:
    if callable(target):
        return target
    names = [str(t) for t in target]
    return lambda path, mod: any(path == t or path.endswith("." + t) for t in names)


def inject_multilora(model: nn.Module, target: Callable[[str, nn.Module], bool] | list[str], n_adapters: int,
                     rank: int, alpha: float, seeds: list[int], name_prefix: str = "",
                     dropout: float | Sequence[float] = 0.0) -> MultiLoRA:
    """Wrap every targeted ``nn.Linear`` of ``model`` with K = ``n_adapters`` LoRA adapters of rank ``rank``.

    ``target`` is a predicate ``(module_path, module) -> bool`` or a list of names matched like PEFT's
    ``target_modules`` (the path equals the name or ends with ``"." + name``). Base weights are frozen
    (``requires_grad_(False)`` on the whole model). ``seeds[k]`` fixes adapter k's A init and dropout masks;
    ``dropout`` is the LoRA dropout probability, one for all or one per adapter.
    """
    if len(seeds) != n_adapters:
        raise ValueError(f"inject_multilora: {len(seeds)} seeds for {n_adapters} adapters")
    if rank <= 0 or n_adapters <= 0:
        raise ValueError(f"inject_multilora: rank and n_adapters must be positive, got {rank}, {n_adapters}")
    drop = torch.as_tensor(dropout, dtype=torch.float64).flatten()
    if drop.numel() == 1:
        drop = drop.expand(n_adapters).clone()
    if drop.numel() != n_adapters or bool(((drop < 0) | (drop >= 1)).any()):
        raise ValueError(f"inject_multilora: dropout must be one value or {n_adapters} values in [0, 1)")
    match = _matcher(target)
    chosen = [(p, m) for p, m in model.named_modules()
              if isinstance(m, nn.Linear) and not isinstance(m, MultiLoRALinear) and p and match(p, m)]
    if not chosen:
        raise ValueError(f"inject_multilora: no nn.Linear in {type(model).__name__} matches target {target!r}")
    model.requires_grad_(False)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    owner = MultiLoRA(model, {}, {}, n_adapters, rank, alpha, seeds, drop, name_prefix)
    for path, lin in chosen:  # named_modules order: the same for every K, so adapter k's init depends on seed k only
        w = lin.weight
        bound = 1.0 / math.sqrt(lin.in_features)  # kaiming_uniform_(a=√5) on (r, in)
        A = torch.stack([(torch.rand(rank, lin.in_features, generator=g, dtype=torch.float64) * 2 - 1) * bound
                         for g in gens]).to(device=w.device, dtype=w.dtype)
        layer = MultiLoRALinear(lin, A, owner.scale, path, owner)
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, layer)
        owner.layers[path] = layer
        owner._parents[path] = (parent, attr)
    return owner


def sum_of_means(per_sample: torch.Tensor, idx: torch.Tensor, n_adapters: int,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_k w_k · mean_{i: idx_i = k} loss_i: the pass loss that keeps adapters' gradients independent.

    ``per_sample`` is (N,) (reduce other dims first); ``weight`` (K,) e.g. ``1 / grad_accumulation``.
    Adapters with no samples contribute nothing.
    """
    idx = torch.as_tensor(idx, device=per_sample.device)
    sums = torch.zeros(n_adapters, dtype=per_sample.dtype, device=per_sample.device)
    keep = idx >= 0
    sums = sums.index_add(0, idx[keep], per_sample[keep])
    counts = torch.bincount(idx[keep], minlength=n_adapters).to(per_sample.dtype).clamp(min=1)
    means = sums / counts
    if weight is not None:
        means = means * torch.as_tensor(weight, dtype=per_sample.dtype, device=per_sample.device)
    return means.sum()


class PerLoRAAdam:
    """AdamW (decoupled weight decay, as `torch.optim.AdamW`) with per-adapter lr, weight decay and step count.

    ``step(active)`` updates only adapters with ``active[k]``; the others keep their parameters, moments, step count
    and accumulated gradients (so an adapter with gradient accumulation g is simply active every g-th pass).
    """

    def __init__(self, multilora: MultiLoRA, lr, weight_decay, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = multilora.parameters()
        K = multilora.n_adapters
        self.K = K
        dev = self.params[0].device
        self.lr = torch.as_tensor(lr, dtype=torch.float64).flatten().expand(K).clone().to(dev)
        self.weight_decay = torch.as_tensor(weight_decay, dtype=torch.float64).flatten().expand(K).clone().to(dev)
        self.betas = betas
        self.eps = eps
        self.steps = torch.zeros(K, dtype=torch.long)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def _active(self, active) -> torch.Tensor:
        if active is None:
            return torch.ones(self.K, dtype=torch.bool)
        a = torch.as_tensor(active, dtype=torch.bool).cpu()
        if a.shape != (self.K,):
            raise ValueError(f"PerLoRAAdam: active must have shape ({self.K},), got {tuple(a.shape)}")
        return a

    @torch.no_grad()
    def step(self, active=None) -> None:
        act = self._active(active)
        if not bool(act.any()):
            return
        self.steps[act] += 1
        b1, b2 = self.betas
        dev = self.params[0].device
        t = self.steps.to(torch.float64)
        bc1 = (1 - b1 ** t).clamp(min=1e-300).to(dev)
        bc2 = (1 - b2 ** t).clamp(min=1e-300).to(dev)
        ks = act.nonzero().flatten().to(dev)
        lr, wd = self.lr[ks], self.weight_decay[ks]
        step_size = lr / bc1[ks]
        sq_bc2 = bc2[ks].sqrt()
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.ndim - 1)
            g = p.grad[ks]
            pk = p[ks]
            pk = pk * (1 - (lr * wd).to(p.dtype).view(shape))
            mk = m[ks].mul_(b1).add_(g, alpha=1 - b1)
            vk = v[ks].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = vk.sqrt() / sq_bc2.to(p.dtype).view(shape) + self.eps
            pk = pk - step_size.to(p.dtype).view(shape) * mk / denom
            p[ks] = pk
            m[ks] = mk
            v[ks] = vk

    @torch.no_grad()
    def zero_grad(self, active=None) -> None:
        """Clear the accumulated gradients of the active adapters (all when ``active`` is None)."""
        act = self._active(active)
        ks = act.nonzero().flatten()
        for p in self.params:
            if p.grad is not None:
                p.grad[ks.to(p.grad.device)] = 0

    def state_dict(self) -> dict:
        return {"steps": self.steps.clone(), "exp_avg": [m.clone() for m in self.exp_avg],
                "exp_avg_sq": [v.clone() for v in self.exp_avg_sq]}


def accumulation_schedule(micro_steps: Sequence[int], grad_accum: Sequence[int]):
    """Yield ``(participate, step, weight)`` per pass for K adapters trained together.

    Adapter k runs ``micro_steps[k]`` micro-batches (= optimizer steps × grad_accum[k]); it takes part in a pass while
    it has micro-batches left, steps its optimizer after every ``grad_accum[k]``-th of them (and after its last one),
    and its loss is weighted by ``1 / grad_accum[k]`` as in single-adapter gradient accumulation.
    Pass ``t`` of this schedule is micro-batch ``t`` of every participating adapter, so each adapter sees the same
    sequence of micro-batches as when trained alone.
    """
    micro = torch.as_tensor(list(micro_steps), dtype=torch.long)
    acc = torch.as_tensor(list(grad_accum), dtype=torch.long)
    if micro.shape != acc.shape or bool((acc < 1).any()) or bool((micro < 0).any()):
        raise ValueError("accumulation_schedule: micro_steps and grad_accum need one non-negative / positive value "
                         "per adapter")
    weight = 1.0 / acc.to(torch.float64)
    for t in range(int(micro.max()) if micro.numel() else 0):
        participate = micro > t
        step = participate & (((t + 1) % acc == 0) | (micro == t + 1))
        yield participate, step, weight
