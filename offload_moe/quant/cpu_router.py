"""Top-k routers on offload_moe's CPU kernels: `CpuRouter`, and `use_fast_routers(model)`.

transformers' routers (MixtralTopKRouter, Qwen3MoeTopKRouter, OlmoeTopKRouter, GptOssTopKRouter,
...) are not nn.Linear, so `use_fast_linears` leaves them to torch's 16-bit matmul, and each
decode step pays that slow product plus softmax, topk, sum and division as separate small ops
per MoE layer. A CpuRouter computes the logits as a CpuLinear does (dense_matmul: the kernel at
decode, fp32 tiles or torch for many tokens) and the routing with one route_topk call.

Families route in a few ways (softmax then top-k, renormalised or not; top-k then softmax; scores
in fp32 or in the logits' dtype), so each router module is checked at load against its own
forward on a random input, in every recipe, and swapped only for the one that gives the same
experts (the same indices, scores within 1% and logits within a few roundings); routers that do
more (DeepSeek's grouped top-k and score bias, sigmoid gates, jitter) match none and keep their
forward. The swapped module is an instance of the router's class too (cpu_linear.subclass_of).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from offload_moe.quant import dense_kernel
from offload_moe.quant.dense_matmul import Workspace, dense_matmul
from offload_moe.quant.cpu_linear import FAST_DTYPES, subclass_of, swap_modules
from offload_moe.quant.dense_switch import kind_of, switch_for


@dataclass(frozen=True)
class Recipe:
    """How a router turns logits into (scores, indices): dense_kernel.route_topk's order and renorm,
    and whether its scores are fp32 (else the logits' dtype)."""

    order: int
    renorm: bool
    fp32_scores: bool


RECIPES = tuple(Recipe(o, r, f) for o, r, f in itertools.product((0, 1), (True, False), (True, False))
                if not (o == 1 and r))  # top-k then softmax sums to 1 already


class CpuRouter(nn.Module):
    """A top-k router's weight (and bias) Parameters, the same objects, and its recipe: forward
    (hidden [..., H]) -> (logits [T, E] in hidden's dtype, scores [T, k], indices int64 [T, k])."""

    def __init__(self, router: nn.Module, top_k: int, recipe: Recipe, workspace: Workspace | None = None):
        nn.Module.__init__(self)  # not the router class's own __init__ (see cpu_linear.subclass_of), which builds weights
        self.weight = router.weight
        self.bias = getattr(router, "bias", None)
        self.top_k, self.recipe = top_k, recipe
        self.num_experts, self.hidden_dim = router.weight.shape
        self.workspace = Workspace() if workspace is None else workspace  # prefill's fp32 tiles

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, {self.recipe}"

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = hidden_states.reshape(-1, self.hidden_dim)
        if not dense_kernel.available():  # OFFLOAD_MOE_CPU_KERNEL=torch, read per call as by CpuLinear
            return route_reference(flat, self.weight, self.bias, self.top_k, self.recipe)
        switch = switch_for(kind_of(self.weight.dtype))
        logits = dense_matmul(flat, self.weight, self.bias, self.workspace, switch)  # the kernel at decode
        scores_dtype = torch.float32 if self.recipe.fp32_scores else logits.dtype
        indices, scores = dense_kernel.route_topk(logits, self.top_k, self.recipe.order, self.recipe.renorm,
                                                  scores_dtype)
        return logits, scores, indices


def route_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                    recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a CpuRouter computes, in torch ops (transformers' routers, written once per recipe)."""
    logits = F.linear(hidden, weight, bias)
    if recipe.order == 0:
        top, indices = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
        if recipe.renorm:
            top = top / top.sum(dim=-1, keepdim=True)
    else:
        top, indices = torch.topk(logits.float(), top_k, dim=-1)
        top = torch.softmax(top, dim=-1)
    return logits, top.to(torch.float32 if recipe.fp32_scores else logits.dtype), indices


def router_top_k(module: nn.Module) -> int | None:
    """The k of a module that looks like a top-k router (a 2-D 16-bit CPU weight Parameter [E, H],
    an optional bias [E], an int top_k, 'Router' in its class name), else None."""
    weight, bias, k = getattr(module, "weight", None), getattr(module, "bias", None), getattr(module, "top_k", None)
    if ("Router" not in type(module).__name__ or not isinstance(weight, nn.Parameter) or weight.dim() != 2
            or weight.device.type != "cpu" or weight.dtype not in FAST_DTYPES or not isinstance(k, int)
            or not 1 <= k <= min(weight.shape[0], dense_kernel.MAX_EXPERTS)):
        return None
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        return None
    return k


def matching_recipe(module: nn.Module, top_k: int) -> Recipe | None:
    """The recipe in which a CpuRouter reproduces `module` on a random [32, H] input, or None: its
    logits within a few roundings, and, from the module's own logits, the same experts with
    scores within 1% in every recipe-independent way (rows whose k-th and next logits tie, which
    any two top-k implementations may break differently, are not compared)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, module.weight.shape[1], generator=gen).to(module.weight.dtype)
    with torch.no_grad():
        try:
            want = module(x)
        except (RuntimeError, ValueError, TypeError, AttributeError):
            return None
    if not (isinstance(want, tuple) and len(want) == 3 and all(isinstance(t, torch.Tensor) for t in want)):
        return None
    logits, scores, indices = want
    if logits.shape != (32, module.weight.shape[0]) or indices.shape != (32, top_k) or scores.shape != indices.shape:
        return None
    ours = dense_kernel.dense16_gemv(x, module.weight, bias=getattr(module, "bias", None), out_dtype=x.dtype)
    tolerance = 4 * torch.finfo(logits.dtype).eps * logits.float().abs().max()
    if ours.dtype != logits.dtype or (ours.float() - logits.float()).abs().max() > tolerance:
        return None
    ranked = logits.float().sort(dim=-1, descending=True).values
    untied = ranked[:, top_k - 1] != ranked[:, top_k] if top_k < ranked.shape[1] else torch.ones(32, dtype=torch.bool)
    for recipe in RECIPES:
        got_indices, got_scores = dense_kernel.route_topk(logits, top_k, recipe.order, recipe.renorm,
                                                          torch.float32 if recipe.fp32_scores else logits.dtype)
        if got_scores.dtype == scores.dtype and _same_routing(got_indices, got_scores, indices, scores, untied):
            return recipe
    return None


def _same_routing(got_indices: torch.Tensor, got_scores: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor,
                  rows: torch.Tensor) -> bool:
    """The same expert sets in `rows`, each expert's score within 1% of the largest."""
    def by_expert(i: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = i[rows].argsort(dim=-1)
        return i[rows].gather(1, order), s[rows].float().gather(1, order)

    (a, sa), (b, sb) = by_expert(got_indices, got_scores), by_expert(indices, scores)
    return torch.equal(a, b) and bool(((sa - sb).abs() <= 1e-2 * sb.abs().max().clamp(min=1e-6)).all())


def use_fast_routers(model: nn.Module, workspace: Workspace | None = None) -> int:
    """Replace every top-k router of `model` on the CPU that a CpuRouter reproduces (see the module
    docstring) by one sharing its Parameters (and `workspace`, the model's linears' scratch);
    returns how many were replaced. Called at load, before the loader hooks the routers."""
    if not dense_kernel.available():
        return 0

    def fast(child: nn.Module) -> CpuRouter | None:
        k = router_top_k(child)
        recipe = None if k is None else matching_recipe(child, k)
        return None if recipe is None else subclass_of(CpuRouter, type(child))(child, k, recipe, workspace)

    return swap_modules(model, fast)
