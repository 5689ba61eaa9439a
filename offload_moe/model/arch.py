"""Architecture facts, read from the transformers model itself instead of a table per family.

In transformers 5.x most MoE families share one experts contract: an `experts` module with
fused 3-D weights and `forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])`.
What differs is small, and this module finds it on the model built on the meta device:

* where the experts modules are (which decoder layers are sparse: Qwen2-MoE's
  `decoder_sparse_step`, DeepSeek's `first_k_dense_replace`, Jamba's expert period all fall out
  of walking the model);
* how one expert computes. offload_moe reproduces an eager experts forward bit for bit only if
  it knows it, so the class's eager forward is compared (as a syntax tree, ignoring comments and
  docstrings) with the three it implements:

  - FUSED (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, PhiMoE, Granite-MoE, Jamba and most
    other families; `pytest tests/test_architectures.py -k every_moe -s` lists them): `gate, up = linear(x, gate_up[2F, H]).chunk(2)`, `linear(act(gate) * up, down[H, F])`;
  - TRANSPOSED (gpt-oss): `x @ gate_up[H, 2F] + b`, the class's own `_apply_gate`
    (interleaved gate/up, clamped SwiGLU), `@ down[F, H] + b`;
  - DBRX: `w1`, `v1`, `w2` stored as `[E*F, H]`, `x @ w1.T`, `x @ v1.T`, `(act(g) * u) @ w2`.

  Anything else is refused with a message naming the class, never run with wrong numbers.
  DeepSeekMoE-16B and LLaMA-MoE v1, published only with remote code, are offload_moe's own
  models (model/deepseek_moe.py, model/llama_moe.py) with FUSED experts;
* the router next to each experts module (for prefetch and policies; routing itself always
  runs the model's own router).

Checkpoint names come from transformers' own conversion mapping (see checkpoint_map.py).
"""

from __future__ import annotations

import ast
import enum
import functools
import inspect
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from offload_moe.errors import UnsupportedArchitectureError


class ExpertsKind(enum.Enum):
    """Which eager experts forward a model's experts module runs (see the module docstring)."""

    FUSED = "fused"
    TRANSPOSED = "transposed"
    DBRX = "dbrx"


# One experts class per kind whose eager forward is the reference for that kind.
_KIND_REFERENCES = {
    ExpertsKind.FUSED: ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts"),
    ExpertsKind.TRANSPOSED: ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts"),
    ExpertsKind.DBRX: ("transformers.models.dbrx.modeling_dbrx", "DbrxExperts"),
}


def _eager_forward_tree(cls: type) -> str:
    """The syntax tree of `cls`'s eager forward (the undecorated one), without docstring,
    annotations or name, as a string: equal strings mean the same computation on the same
    attributes."""
    forward = cls.forward
    forward = getattr(forward, "__wrapped__", forward)  # use_experts_implementation wraps it
    node = ast.parse(textwrap.dedent(inspect.getsource(forward))).body[0]
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        node.body = body[1:]
    node.decorator_list, node.name, node.returns = [], "forward", None
    for arg in node.args.args:
        arg.annotation = None
    return ast.dump(node)


@functools.cache
def _reference_trees() -> dict[str, ExpertsKind]:
    import importlib

    trees = {}
    for kind, (module_name, class_name) in _KIND_REFERENCES.items():
        cls = getattr(importlib.import_module(module_name), class_name)
        trees[_eager_forward_tree(cls)] = kind
    return trees


@functools.cache
def experts_kind_of_class(cls: type) -> ExpertsKind | None:
    """The kind of an experts class, or None when offload_moe does not reproduce its forward."""
    try:
        tree = _eager_forward_tree(cls)
    except (OSError, TypeError, SyntaxError):  # no source available
        return None
    return _reference_trees().get(tree)


def _is_experts_module(module: nn.Module) -> bool:
    """An experts module of the shared contract (decorated with use_experts_implementation),
    or one whose class offload_moe knows by its forward (DBRX)."""
    if hasattr(module, "is_concatenated") and hasattr(module, "has_gate"):
        return True
    return type(module).__name__.endswith("Experts") and experts_kind_of_class(type(module)) is ExpertsKind.DBRX


@dataclass(frozen=True)
class ExpertMatrix:
    """One weight matrix of a gated expert in the canonical orientation [out, in].

    `roles` are the checkpoint's per-expert matrices it fuses, stacked along the rows in this
    order (gate_up: rows [:F] gate, [F:] up)."""

    name: str
    out_features: int
    in_features: int
    roles: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def role_shape(self) -> tuple[int, int]:
        """[out, in] of each role's own matrix."""
        return (self.out_features // len(self.roles), self.in_features)


def expert_matrices(hidden: int, intermediate: int) -> tuple[ExpertMatrix, ExpertMatrix]:
    """The two matrices of a gated expert, gate_up [2F, H] and down [H, F]: every store layout,
    format check, kernel and converted file derives its shapes from this pair."""
    return (ExpertMatrix("gate_up", 2 * intermediate, hidden, ("gate", "up")),
            ExpertMatrix("down", hidden, intermediate, ("down",)))


def role_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """[out, in] of each per-expert checkpoint matrix: gate [F, H], up [F, H], down [H, F]."""
    return {role: m.role_shape for m in expert_matrices(hidden, intermediate) for role in m.roles}


@dataclass(frozen=True)
class MoeLayer:
    """One sparse-MoE layer of the model."""

    index: int  # decoder layer number (the key of Runtime.experts)
    experts_path: str  # dotted path of the experts module, e.g. "model.layers.3.mlp.experts"
    router_path: str | None  # dotted path of the router module whose weight is [E, H], if any

    @property
    def block_path(self) -> str:
        return self.experts_path.rpartition(".")[0]


@dataclass(frozen=True)
class ArchSpec:
    """How one model's experts are shaped and computed.

    Expert fields, per expert, in the orientation the model holds them (so the dense path
    computes exactly what the model's eager forward does):
      FUSED       gate_up [2F, H], down [H, F]
      TRANSPOSED  gate_up [H, 2F], gate_up_bias [2F], down [F, H], down_bias [H]
      DBRX        gate_up [2F, H] (w1 rows then v1 rows), down [F, H] (w2 as stored)
    """

    model_type: str
    kind: ExpertsKind
    num_experts: int
    hidden: int
    intermediate: int  # F, one expert's FFN width
    top_k: int
    layers: tuple[MoeLayer, ...]

    @property
    def moe_layers(self) -> list[int]:
        return [layer.index for layer in self.layers]

    @property
    def matrices(self) -> tuple[ExpertMatrix, ExpertMatrix]:
        return expert_matrices(self.hidden, self.intermediate)

    def transposed(self, field: str) -> bool:
        """True if `field` is held as [in, out] rather than the canonical [out, in]."""
        if self.kind is ExpertsKind.TRANSPOSED:
            return field in ("gate_up", "down")
        return self.kind is ExpertsKind.DBRX and field == "down"

    def dense_fields(self, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of one unquantized expert's fields."""
        fields = []
        for m in self.matrices:
            shape = m.shape[::-1] if self.transposed(m.name) else m.shape
            fields.append((m.name, shape, dtype))
            if self.kind is ExpertsKind.TRANSPOSED:
                fields.append((f"{m.name}_bias", (m.out_features,), dtype))
        return fields

    def bias_fields(self, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The unquantized bias fields a quantized expert keeps next to its packed matrices."""
        return [spec for spec in self.dense_fields(dtype) if spec[0].endswith("_bias")]

    def canonical(self, fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An expert's matrices as [out, in] (gate_up [2F, H], down [H, F]) for quantization, and
        its biases as they are."""
        return {name: (t.t().contiguous() if self.transposed(name) else t) for name, t in fields.items()}



def _layer_index(path: str) -> int:
    numbers = re.findall(r"\.(\d+)\.", f".{path}.")
    if not numbers:
        raise UnsupportedArchitectureError(f"experts module {path!r} sits in no numbered decoder layer")
    return int(numbers[0])


def _find_router(block: nn.Module, num_experts: int, hidden: int) -> str | None:
    """The submodule of a MoE block (outside its experts) whose weight is [E, H]: the router,
    or the one the block names (`router_name`: LLaMA-MoE's router is a whole gate network)."""
    declared = getattr(block, "router_name", None)
    if isinstance(declared, str):
        return declared
    for name, module in block.named_modules():
        if name.startswith("experts") or not name:
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (num_experts, hidden):
            return name
    return None


def describe_model(model: nn.Module, config_path: str = "config.json") -> ArchSpec:
    """The ArchSpec of a transformers model (built on the meta device), or a clear refusal."""
    config = model.config
    found = [(path, module) for path, module in model.named_modules() if _is_experts_module(module)]
    model_type = getattr(config, "model_type", "?")
    if not found:
        raise UnsupportedArchitectureError(
            f"{config_path}: model_type {model_type!r} is not supported: {type(model).__name__} has no experts module "
            "of the transformers MoE contract (an `experts` module decorated with use_experts_implementation)"
        )
    first = found[0][1]
    kind = experts_kind_of_class(type(first))
    if kind is None:
        raise UnsupportedArchitectureError(
            f"{config_path}: model_type {model_type!r} is not supported: the eager forward of {type(first).__qualname__} is not one "
            "offload_moe reproduces exactly (supported: the Mixtral-style fused gate_up/down forward, gpt-oss's "
            "transposed forward with biases, and DBRX's)"
        )
    if getattr(first, "has_post_expert_norm", False):
        raise UnsupportedArchitectureError(
            f"{config_path}: model_type {model_type!r} is not supported: {type(first).__qualname__} has a post-expert norm")
    if kind is ExpertsKind.DBRX:
        num_experts = int(first.num_experts)
        hidden = int(first.hidden_size)
        intermediate = int(first.ffn_hidden_size)
    else:
        gate_up = first.gate_up_proj
        num_experts = int(gate_up.shape[0])
        if kind is ExpertsKind.FUSED:
            intermediate, hidden = int(gate_up.shape[1]) // 2, int(gate_up.shape[2])
        else:
            hidden, intermediate = int(gate_up.shape[1]), int(gate_up.shape[2]) // 2
    layers = []
    for path, module in found:
        if type(module) is not type(first):
            raise UnsupportedArchitectureError(
                f"{config_path}: experts modules of two classes ({type(first).__name__}, {type(module).__name__})"
            )
        block_path = path.rpartition(".")[0]
        router = _find_router(model.get_submodule(block_path), num_experts, hidden)
        layers.append(MoeLayer(_layer_index(path), path, f"{block_path}.{router}" if router else None))
    top_k = _top_k(config)
    return ArchSpec(
        model_type=model_type, kind=kind, num_experts=num_experts, hidden=hidden, intermediate=intermediate,
        top_k=top_k, layers=tuple(layers),
    )


def _top_k(config) -> int:
    try:
        config = config.get_text_config()  # multimodal families: the language model's
    except (AttributeError, ValueError):  # no or several text configs: the top level decides
        pass
    for key in ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    ffn = getattr(config, "ffn_config", None)
    return int(getattr(ffn, "moe_top_k", 2))


def router_probs(router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Probabilities [T, E] the router gives tokens `hidden` [T, H]: softmax of its logits
    (for prefetch and policies; a ranking, whatever the family's exact routing function)."""
    if not isinstance(getattr(router, "weight", None), torch.Tensor):  # a gate network (LLaMA-MoE): run it
        # .forward, not __call__: the loader's logits hook on the router must see only the layer's own call.
        logits = router.forward(hidden.to(next(router.parameters()).dtype))
        return torch.softmax(logits.float(), dim=-1)
    bias = getattr(router, "bias", None)
    logits = nn.functional.linear(hidden.to(router.weight.dtype), router.weight,
                                  bias if isinstance(bias, torch.Tensor) else None)
    return torch.softmax(logits.float(), dim=-1)


def apply_gate_fn(spec: ArchSpec, experts_module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function from an expert's gate_up output [T, 2F] to its down input [T, F]."""
    if spec.kind is ExpertsKind.TRANSPOSED:
        return experts_module._apply_gate  # the class's own (gpt-oss: interleaved, clamped)
    return gated(experts_module.mlp.activation_fn if spec.kind is ExpertsKind.DBRX else experts_module.act_fn)


GateFn = Callable[[torch.Tensor], torch.Tensor]  # gate_up output [T, 2F] -> down input [T, F]


def gated(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> GateFn:
    """The usual gate: gate_up [T, 2F] (gate columns first) -> act(gate) * up [T, F]."""

    def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act_fn(gate) * up

    return apply_gate


def matrix_fields(fields: dict[str, torch.Tensor], matrix: str) -> dict[str, torch.Tensor]:
    """The fields of one matrix ("gate_up" or "down") of an expert's prefixed field dict
    ("gate_up.qweight" -> "qweight")."""
    prefix = matrix + "."
    return {name[len(prefix) :]: t for name, t in fields.items() if name.startswith(prefix)}
