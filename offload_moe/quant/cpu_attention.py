"""Self-attention at decode on offload_moe's CPU kernels: `CpuAttention`, and `use_fast_attention(model)`.

Between a decode step's projections, transformers' attention is some twenty small torch ops:
views and transposes, rotary's slices, concatenation and four products, the fp32 widening of the
whole KV cache (offload_moe.model.fp32_attention), SDPA and the casts back. Each is cheap warm,
but every weight stream before it has flushed the caches, so on the CPU they cost several times
their warm time, every layer, every token. For one token of one sequence with no mask (what
generate() runs after the prompt), a CpuAttention makes two native calls: q, k and v in one
(dense_kernel.GemvGroup over the three 16-bit projections, with the rotary embedding applied to q
and k in the same call, in the activations' dtype, bit-equal to transformers'), then, after the
cache's own update, decode_attention (SDPA's fp32 math read from the 16-bit cache in place) with
the output projection in the same call. q/k norms (Qwen3's on each head, OLMoE's on the
projection) run as their modules between the projection and a separate rope16 call; q8
projections run as their modules. Everything else (prompts, batches, masks, a cache that needs
one, another attention implementation, training) runs the module's own forward, unchanged.

Attention modules differ (norms on each head or on the whole projection, sinks, soft-capping,
clipping, other rotary layouts, multi-head latent attention), so a module is swapped only after
the fast path reproduces its own forward on a random token against a random cache: the cache's new
keys and values bit-equal, the output within a few roundings of its scale. The swapped module is
an instance of the attention class too (cpu_linear.subclass_of), so output recorders still find it.
"""

from __future__ import annotations

import torch
from torch import nn

from offload_moe.model.fp32_attention import FP32_SDPA, sdpa_fp32
from offload_moe.quant import dense_kernel
from offload_moe.quant.cpu_linear import CpuLinear, subclass_of, swap_modules

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
NORMS = ("none", "head", "projection")  # q_norm/k_norm: absent, on each head [.., D], on the projection [.., H * D]
CHECK_POSITIONS = 9  # cached positions in the load-time check
CHECK_ROUNDINGS = 4  # the output's allowed distance from the module's own, in roundings of its largest value


class CpuAttention(nn.Module):
    """An attention module's projections and q/k norms (the same module objects) and its
    attributes; decodes one token on the CPU kernels, else calls the module's own forward."""

    def __init__(self, attention: nn.Module, norms: str):
        nn.Module.__init__(self)  # not the attention class's own __init__ (see cpu_linear.subclass_of)
        for name, value in vars(attention).items():  # config, layer_idx, head_dim, scaling, ...
            if not name.startswith("_"):  # training included
                setattr(self, name, value)
        for name, child in attention.named_children():
            self.add_module(name, child)
        self.norms = norms
        self.heads = self.q_proj.out_features // self.head_dim
        self.kv_heads = self.k_proj.out_features // self.head_dim
        self._own_forward = attention.forward  # the replaced module, outside the module tree: its children are ours
        # 16-bit projections (CpuLinears; q8 ones are called as modules): their weights as they are
        # now, read by the kernel calls (they stay fixed after load): the same sums as the modules'
        projections = (self.q_proj, self.k_proj, self.v_proj)
        self._qkv = dense_kernel.GemvGroup([p.weight for p in projections], [p.bias for p in projections]) \
            if all(type(p) is CpuLinear for p in projections) else None
        self._o = dense_kernel.GemvGroup([self.o_proj.weight], [self.o_proj.bias]) \
            if type(self.o_proj) is CpuLinear else None

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, norms={self.norms}"

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        use = self._decodes(hidden_states, position_embeddings, attention_mask, cache, kwargs)
        if use is None:
            return self._own_forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        return self._decode(hidden_states, position_embeddings, cache, kwargs, use), None

    def _decodes(self, x: torch.Tensor, position_embeddings, mask, cache, kwargs: dict) -> int | None:
        """The kernel variant to decode this call with, if it is one the fast path reproduces: one
        token of one sequence, no mask (every cached position attended, as SDPA without one), a
        cache, the fp32 SDPA this module was checked against, the kernel on (OFFLOAD_MOE_CPU_KERNEL=
        torch is read per call); else None."""
        if (mask is None and cache is not None and x.dim() == 3 and x.shape[0] == 1 and x.shape[1] == 1
                and position_embeddings is not None and position_embeddings[0].dtype == x.dtype
                and "past_key_values" not in kwargs and not self.training
                and self.config._attn_implementation == FP32_SDPA):
            return dense_kernel.variant()
        return None

    def _decode(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], cache,
                kwargs: dict, use: int) -> torch.Tensor:  # x [1, 1, H] -> [1, 1, H]
        dim, heads, kv_heads = self.head_dim, self.heads, self.kv_heads
        cos, sin = (t.reshape(1, dim) for t in position_embeddings)
        if self.norms == "none" and self._qkv is not None:  # q, k, v and q and k rotated: one call
            qkv = self._qkv(x, x.dtype, use, rotary=(cos, sin, heads + kv_heads)).view(heads + 2 * kv_heads, dim)
            q, k = qkv[:heads], qkv[heads : heads + kv_heads]
        else:
            qkv = self._qkv(x, x.dtype, use) if self._qkv is not None else \
                torch.cat([p(x) for p in (self.q_proj, self.k_proj, self.v_proj)], dim=-1)
            q, k = qkv[..., : heads * dim], qkv[..., heads * dim : (heads + kv_heads) * dim]
            if self.norms == "projection":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q.reshape(1, heads, dim), k.reshape(1, kv_heads, dim)
            if self.norms == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = (dense_kernel.rope16(t.contiguous(), cos, sin)[0] for t in (q, k))
            qkv = qkv.view(heads + 2 * kv_heads, dim)
        v = qkv[heads + kv_heads :]  # [kv_heads, D]
        keys, values = cache.update(k.view(1, kv_heads, 1, dim), v.view(1, kv_heads, 1, dim), self.layer_idx,
                                    kwargs=kwargs)  # [1, kv_heads, L, D] each
        if not all(t.dtype == x.dtype and t.stride(-1) == 1 for t in (keys, values)):  # a cache of other tensors
            out, _ = sdpa_fp32(self, q.view(1, heads, 1, dim), keys, values, None, scaling=self.scaling, dropout=0.0)
            return self.o_proj(out.reshape(1, 1, heads * dim))  # SDPA as the module's own forward runs it
        if self._o is not None:  # attention and output projection: one call
            return dense_kernel.decode_attention(q, keys[0], values[0], self.scaling, x.dtype, self._o,
                                                 use).view(1, 1, -1)
        out = dense_kernel.decode_attention(q, keys[0], values[0], self.scaling, x.dtype, use=use)  # [heads, D]
        return self.o_proj(out.view(1, 1, heads * dim))


def norms_of(attention: nn.Module) -> str | None:
    """Which of NORMS a module that looks like decoder self-attention has (q/k/v/o projections with
    out_features, an int head_dim and layer_idx, a float scaling, no parameters of its own such as
    sinks, no soft-capping or clipping in its config, a head_dim the kernels take), else None."""
    projections = [getattr(attention, name, None) for name in PROJECTIONS]
    head_dim, config = getattr(attention, "head_dim", None), getattr(attention, "config", None)
    if (any(not isinstance(getattr(p, "out_features", None), int) for p in projections)
            or not isinstance(head_dim, int) or not isinstance(getattr(attention, "layer_idx", None), int)
            or not isinstance(getattr(attention, "scaling", None), float) or config is None
            or head_dim % 8 or head_dim > dense_kernel.MAX_HEAD_DIM or list(attention.named_parameters(recurse=False))
            or getattr(config, "clip_qkv", None) is not None or getattr(config, "attn_logit_softcapping", None)):
        return None
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    if q_norm is None and k_norm is None:
        return "none"
    sizes = [getattr(getattr(n, "weight", None), "shape", (None,))[0] for n in (q_norm, k_norm)]
    if sizes == [head_dim, head_dim]:
        return "head"
    return "projection" if sizes == [projections[0].out_features, projections[1].out_features] else None


def reproduces(attention: nn.Module, fast: CpuAttention, dtype: torch.dtype) -> bool:
    """Whether `fast` decodes a random token of `dtype` against a random cache as `attention` does
    (see the module docstring)."""
    from transformers import DynamicCache

    gen, dim = torch.Generator().manual_seed(0), fast.head_dim
    x = torch.randn(1, 1, fast.q_proj.in_features, generator=gen).to(dtype)
    angles = torch.rand(1, 1, dim, generator=gen) * 6
    rotary = (angles.cos().to(dtype), angles.sin().to(dtype))
    past = [torch.randn(1, fast.kv_heads, CHECK_POSITIONS, dim, generator=gen).to(dtype) for _ in range(2)]
    results = []
    for module in (attention, fast):
        cache = DynamicCache()
        cache.update(past[0].clone(), past[1].clone(), fast.layer_idx)
        try:
            with torch.no_grad():
                out, _ = module(x, rotary, None, cache=cache)
        except (RuntimeError, ValueError, TypeError, AttributeError):
            return False
        layer = cache.layers[fast.layer_idx]
        results.append((out, layer.keys, layer.values))
    (want, want_k, want_v), (got, got_k, got_v) = results
    if got.shape != want.shape or got.dtype != want.dtype or not torch.isfinite(want).all():
        return False
    if not (torch.equal(got_k, want_k) and torch.equal(got_v, want_v)):
        return False
    step = torch.finfo(dtype).eps * want.float().abs().max().clamp(min=torch.finfo(dtype).tiny)
    return bool((got.float() - want.float()).abs().max() <= CHECK_ROUNDINGS * step)


def use_fast_attention(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every attention module of `model` (running offload_moe's fp32 SDPA, activations of a
    16-bit `dtype`) whose forward the decode path reproduces by a CpuAttention sharing its
    submodules; returns how many were replaced."""
    if (dtype not in dense_kernel.KV_DTYPES or not dense_kernel.available()
            or model.config._attn_implementation != FP32_SDPA):
        return 0

    def fast(child: nn.Module) -> CpuAttention | None:
        norms = norms_of(child)
        tensors = [*child.parameters(), *child.buffers()]  # (q8 projections hold buffers only)
        if norms is None or isinstance(child, CpuAttention) or any(t.device.type != "cpu" for t in tensors):
            return None
        candidate = subclass_of(CpuAttention, type(child))(child, norms)
        return candidate if reproduces(child, candidate, dtype) else None

    return swap_modules(model, fast)
