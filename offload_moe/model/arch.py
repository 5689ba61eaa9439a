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
  - DBRX: `w1`, `v1`, `w2` stored as `[E*F, H]`, `x @ w1.T`, `x @ v1.T`, `(act(g) * u) @ w2`;
  - DENSE_ACT_DENSE (Switch Transformers, encoder and decoder): a `nn.ModuleDict` of experts
    `expert_0`... computing `wo(act(wi(x)))` without a gate, fed by Switch's top-1 router as a
    one-hot dispatch mask whose all-zero rows are the tokens dropped by expert capacity.
    NLLB-MoE (encoder and decoder, every `encoder_sparse_step`-th layer) has the same kind with
    biased `fc1`/`fc2` experts fed by its own top-2 router (capacity, normalisation, padding
    handling stay the model's). transformers 5.24's `NllbMoeExperts.forward` is wrong: it
    one-hot encodes the router's [T, E] 0/1 top-1 mask, so only expert_0 and expert_1 ever run.
    offload_moe computes the intended equation instead (transformers 4.x's, fairseq's), not that
    forward: with `top_1_mask, combine = router(x)` ([T, E]), a token goes to every expert whose
    combine weight is non-zero (its top-1 and top-2 experts that capacity kept, ascending), and
    `out[t] = sum_e (fc2(act(fc1(x[t]))) * combine[t, e]) * (1 - moe_token_dropout)` (the last
    factor in eval when moe_token_dropout > 0). The class is recognised by name and by its
    known 5.24 forward (`_NLLB_FORWARD_SHA256`): a changed forward is refused until re-checked.

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
    # Switch Transformers: an nn.ModuleDict of non-gated experts (`expert_0`... with `wi`, `wo`),
    # fed a one-hot dispatch mask [T, 1, E] by the model's own top-1 router (see the module docstring).
    DENSE_ACT_DENSE = "dense_act_dense"


# One experts class per kind whose eager forward is the reference for that kind.
_KIND_REFERENCES = {
    ExpertsKind.FUSED: ("transformers.models.mixtral.modeling_mixtral", "MixtralExperts"),
    ExpertsKind.TRANSPOSED: ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssExperts"),
    ExpertsKind.DBRX: ("transformers.models.dbrx.modeling_dbrx", "DbrxExperts"),
    ExpertsKind.DENSE_ACT_DENSE: ("transformers.models.switch_transformers.modeling_switch_transformers",
                                  "SwitchTransformersExperts"),
}

# The non-gated kind, per module: the experts container's forward (above), each expert's own
# forward and the router (whose dispatch mask and top-1 choice offload_moe relies on) must all
# be Switch's. Each expert computes wo(dropout(act(wi(x)))), cast to wo's dtype first.
_DENSE_EXPERT_REFERENCE = ("transformers.models.switch_transformers.modeling_switch_transformers",
                           "SwitchTransformersDenseActDense")
_TOP1_ROUTERS = ("SwitchTransformersTop1Router",)

# NLLB-MoE (see the module docstring): offload_moe replaces NllbMoeExperts, whose 5.24 forward is
# wrong, by the intended computation. It relies on what calls it (NllbMoeSparseMLP: `experts(x [T, H],
# top_1_mask [T, E], combine [T, E])`), so both forwards must be the 5.24 ones checked (sha256 of
# _eager_forward_tree), each expert NLLB's NllbMoeDenseActDense (fc2(dropout(act(fc1(x)))), biased)
# and the router NLLB's top-2 one.
_NLLB_MODULE = "transformers.models.nllb_moe.modeling_nllb_moe"
_NLLB_FORWARD_SHA256 = {
    "NllbMoeExperts": "e9411f9702f77ac7099847d80c822546a89bfe60d44db9e86f9c8fc2cff3cc25",
    "NllbMoeSparseMLP": "dbbf879049959f078421150df2ef72c06644d6e1b94ec156150e5f0a030aa2fa",
}
_NLLB_EXPERT_REFERENCE = (_NLLB_MODULE, "NllbMoeDenseActDense")
_NLLB_ROUTERS = ("NllbMoeTop2Router",)

# Experts classes that look like a kind but whose eager forward computes something else: why,
# for the refusal (checked against transformers 5.24). None today: NLLB-MoE's wrong forward is
# replaced by the intended one (above).
_KNOWN_WRONG: dict[str, str] = {}


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
    or one whose class offload_moe knows by its forward (DBRX), or a dict of per-expert modules
    (`expert_0`, ...: Switch Transformers, NLLB-MoE)."""
    if hasattr(module, "is_concatenated") and hasattr(module, "has_gate"):
        return True
    if isinstance(module, nn.ModuleDict) and type(module).__name__.endswith("Experts") and "expert_0" in module:
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


def expert_matrices(hidden: int, intermediate: int, gated: bool = True) -> tuple[ExpertMatrix, ExpertMatrix]:
    """The two matrices of an expert, gate_up [2F, H] and down [H, F]: every store layout,
    format check, kernel and converted file derives its shapes from this pair. A non-gated
    expert (ExpertsKind.DENSE_ACT_DENSE) keeps the same two slots for its input and output
    projections: "gate_up" is then just the up projection [F, H] (Switch's `wi`), "down" [H, F]
    (`wo`), so every format, layout and kernel serves it unchanged."""
    first = (ExpertMatrix("gate_up", 2 * intermediate, hidden, ("gate", "up")) if gated
             else ExpertMatrix("gate_up", intermediate, hidden, ("up",)))
    return (first, ExpertMatrix("down", hidden, intermediate, ("down",)))


def role_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """[out, in] of each per-expert checkpoint matrix: gate [F, H], up [F, H], down [H, F]."""
    return {role: m.role_shape for m in expert_matrices(hidden, intermediate) for role in m.roles}


@dataclass(frozen=True)
class MoeLayer:
    """One sparse-MoE layer of the model."""

    index: int  # decoder layer number (the key of Runtime.experts)
    experts_path: str  # dotted path of the experts module, e.g. "model.layers.3.mlp.experts"
    router_path: str | None  # dotted path of the router module whose weight is [E, H], if any
    # Encoder-decoder models: "encoder" or "decoder"; `index` is then the block number, plus the
    # encoder's block count in the decoder, so that every MoE layer has its own key.
    stack: str = ""

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
      DENSE_ACT_DENSE  gate_up [F, H] (wi, no gate), down [H, F] (wo);
                     NLLB-MoE also gate_up_bias [F], down_bias [H] (fc1, fc2)
    """

    model_type: str
    kind: ExpertsKind
    num_experts: int
    hidden: int
    intermediate: int  # F, one expert's FFN width
    top_k: int
    layers: tuple[MoeLayer, ...]
    # DENSE_ACT_DENSE only: each expert's input and output linears (Switch "wi", "wo"; NLLB-MoE
    # "fc1", "fc2") and whether they have biases.
    linears: tuple[str, str] = ("wi", "wo")
    expert_bias: bool = False
    # NLLB-MoE: the experts get the router's [T, E] top-1 mask and combine weights (not top-k ids),
    # and each weighted expert output is scaled by `output_scale` (1 - moe_token_dropout) in eval.
    combine_routing: bool = False
    output_scale: float | None = None

    @property
    def moe_layers(self) -> list[int]:
        return [layer.index for layer in self.layers]

    @property
    def gated(self) -> bool:
        """False for non-gated experts (one input projection, no gate)."""
        return self.kind is not ExpertsKind.DENSE_ACT_DENSE

    @property
    def matrices(self) -> tuple[ExpertMatrix, ExpertMatrix]:
        return expert_matrices(self.hidden, self.intermediate, self.gated)

    def stack_layers(self) -> dict[str, list[int]]:
        """MoE layer keys per stack ("encoder", "decoder"; "" for decoder-only models)."""
        out: dict[str, list[int]] = {}
        for layer in self.layers:
            out.setdefault(layer.stack, []).append(layer.index)
        return out

    def transposed(self, field: str) -> bool:
        """True if `field` is held as [in, out] rather than the canonical [out, in]."""
        return field_transposed(self.kind, field)

    def dense_fields(self, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of one unquantized expert's fields."""
        fields = []
        for m in self.matrices:
            shape = m.shape[::-1] if self.transposed(m.name) else m.shape
            fields.append((m.name, shape, dtype))
            if self.kind is ExpertsKind.TRANSPOSED or self.expert_bias:
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
    if type(first).__name__ in _KNOWN_WRONG:
        raise UnsupportedArchitectureError(
            f"{config_path}: model_type {model_type!r} is not supported: {type(first).__qualname__} is not run: "
            f"{_KNOWN_WRONG[type(first).__name__]}")
    nllb = _is_nllb_experts(model, first, f"{config_path}: model_type {model_type!r}")
    if nllb:
        kind = ExpertsKind.DENSE_ACT_DENSE  # the intended computation, not transformers' forward
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
    elif kind is ExpertsKind.DENSE_ACT_DENSE:
        num_experts, hidden, intermediate = _dense_experts_dims(first, f"{config_path}: model_type {model_type!r}", nllb)
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
        if kind is ExpertsKind.DENSE_ACT_DENSE:
            _check_top1_router(model.get_submodule(block_path), f"{config_path}: model_type {model_type!r}", nllb)
        index, stack = _stacked_layer_index(model, path) if config.is_encoder_decoder else (_layer_index(path), "")
        layers.append(MoeLayer(index, path, f"{block_path}.{router}" if router else None, stack))
    top_k = 1 if kind is ExpertsKind.DENSE_ACT_DENSE else _top_k(config)  # Switch's Top1Router
    if nllb:
        return _nllb_spec(model_type, num_experts, hidden, intermediate, tuple(layers), float(first.moe_token_dropout))
    return ArchSpec(
        model_type=model_type, kind=kind, num_experts=num_experts, hidden=hidden, intermediate=intermediate,
        top_k=top_k, layers=tuple(layers),
    )


def _nllb_spec(model_type: str, num_experts: int, hidden: int, intermediate: int, layers: tuple[MoeLayer, ...],
               moe_token_dropout: float) -> ArchSpec:
    """NLLB-MoE's spec: its top-2 router's combine weights, biased fc1/fc2 experts, and in eval
    each weighted expert output times 1 - moe_token_dropout (when it is above 0)."""
    return ArchSpec(model_type=model_type, kind=ExpertsKind.DENSE_ACT_DENSE, num_experts=num_experts, hidden=hidden,
                    intermediate=intermediate, top_k=2, layers=layers, linears=("fc1", "fc2"), expert_bias=True,
                    combine_routing=True, output_scale=1 - moe_token_dropout if moe_token_dropout > 0 else None)


def _is_nllb_experts(model: nn.Module, experts: nn.Module, where: str) -> bool:
    """True for NLLB-MoE's experts with the 5.24 forwards offload_moe replaces (module docstring);
    an NllbMoeExperts whose own or caller's forward changed is refused, naming which."""
    import hashlib

    if type(experts).__name__ != "NllbMoeExperts":
        return False
    caller = next((type(m) for m in model.modules() if getattr(m, "experts", None) is experts), None)
    for cls in (type(experts), caller):
        name = getattr(cls, "__name__", repr(cls))
        try:
            digest = hashlib.sha256(_cached_forward_tree(cls).encode()).hexdigest()
        except (OSError, TypeError, SyntaxError):
            digest = None
        if digest != _NLLB_FORWARD_SHA256.get(name):
            raise UnsupportedArchitectureError(
                f"{where} is not supported: {name}'s eager forward is not transformers 5.24's, whose intended "
                "computation offload_moe runs (re-check the NLLB-MoE equation against it)")
    return True


def _dense_experts_dims(experts: nn.Module, where: str, nllb: bool = False) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) of a dict of per-expert modules, each checked to compute
    Switch's dense-act-dense forward with bias-free `wi` [F, H] and `wo` [H, F] (NLLB-MoE:
    NllbMoeDenseActDense's, `fc1` [F, H] and `fc2` [H, F] with biases)."""
    import importlib

    module_name, class_name = _NLLB_EXPERT_REFERENCE if nllb else _DENSE_EXPERT_REFERENCE
    up_name, down_name = ("fc1", "fc2") if nllb else ("wi", "wo")
    reference = _cached_forward_tree(getattr(importlib.import_module(module_name), class_name))
    # NllbMoeExperts also holds its token-dropout module (training only; its eval scaling is output_scale)
    extra = ["token_dropout"] if nllb else []
    names = [f"expert_{e}" for e in range(len(experts) - len(extra))]
    if list(experts.keys()) != names + extra:
        raise UnsupportedArchitectureError(f"{where} is not supported: experts named {list(experts.keys())[:4]}, "
                                           "not expert_0, expert_1, ...")
    for name in names:
        expert = experts[name]
        wi, wo = getattr(expert, up_name, None), getattr(expert, down_name, None)
        if _cached_forward_tree(type(expert)) != reference or not (isinstance(wi, nn.Linear) and isinstance(wo, nn.Linear)):
            raise UnsupportedArchitectureError(f"{where} is not supported: the eager forward of {type(expert).__qualname__} "
                                               f"is not {class_name}'s dense-act-dense one")
        biased = (wi.bias is not None, wo.bias is not None)
        if biased != (nllb, nllb) or wi.in_features != wo.out_features or wi.out_features != wo.in_features:
            raise UnsupportedArchitectureError(f"{where} is not supported: {name}'s {up_name}/{down_name} have "
                                               f"biases {biased} or unmatched shapes")
    first = getattr(experts[names[0]], up_name)
    return len(names), int(first.in_features), int(first.out_features)


@functools.cache
def _cached_forward_tree(cls: type) -> str:
    return _eager_forward_tree(cls)  # once per class: switch-c-2048 has 61440 experts


def _check_top1_router(block: nn.Module, where: str, nllb: bool = False) -> None:
    """The non-gated kind is fed by Switch's own top-1 router (a [T, 1, E] dispatch mask), or
    NLLB-MoE's by its top-2 router (a [T, E] top-1 mask and combine weights)."""
    router = getattr(block, "router", None)
    if type(router).__name__ not in (_NLLB_ROUTERS if nllb else _TOP1_ROUTERS):
        raise UnsupportedArchitectureError(f"{where} is not supported: its experts are fed by "
                                           f"{type(router).__qualname__}, not "
                                           f"{'NLLB-MoE' if nllb else 'Switch'}'s top-{2 if nllb else 1} router")


def _stacked_layer_index(model: nn.Module, path: str) -> tuple[int, str]:
    """(key, stack) of an encoder-decoder model's experts at `path` ("encoder.block.3.layer.1...."
    -> (3, "encoder"); the decoder's blocks are numbered after the encoder's)."""
    parts = path.split(".")
    stack = next((p for p in parts if p in ("encoder", "decoder")), None)
    position = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if stack is None or position is None:
        raise UnsupportedArchitectureError(f"experts module {path!r} sits in no numbered encoder or decoder block")
    block = int(parts[position])
    if stack == "encoder":
        return block, stack
    encoder_blocks = model.get_submodule(".".join(parts[:position]).replace("decoder", "encoder", 1))
    return len(encoder_blocks) + block, stack


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
    if spec.kind is ExpertsKind.DENSE_ACT_DENSE:
        return experts_module["expert_0"].act  # no gate: the activation of the up projection
    return gated(experts_module.mlp.activation_fn if spec.kind is ExpertsKind.DBRX else experts_module.act_fn)


GateFn = Callable[[torch.Tensor], torch.Tensor]  # gate_up output [T, 2F] ([T, F] non-gated) -> down input [T, F]


def gated(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> GateFn:
    """The usual gate: gate_up [T, 2F] (gate columns first) -> act(gate) * up [T, F]."""

    def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act_fn(gate) * up

    return apply_gate


def field_transposed(kind: ExpertsKind, field: str) -> bool:
    """True if an unquantized expert of `kind` holds `field` as [in, out] rather than [out, in]."""
    if kind is ExpertsKind.TRANSPOSED:
        return field in ("gate_up", "down")
    return kind is ExpertsKind.DBRX and field == "down"


GATE_KINDS = ("silu_mul", "gelu_tanh_mul", "gelu_mul", "relu", "gelu", "gelu_tanh", "swiglu_oai")
_GATED_KINDS = ("silu_mul", "gelu_tanh_mul", "gelu_mul", "swiglu_oai")


@dataclass(frozen=True)
class GateSpec:
    """An expert's gate, declaratively (what a native kernel computes in place of a GateFn).

    kind, from the gate_up output h [T, 2F] ([T, F] non-gated) to the down input [T, F]:
      silu_mul / gelu_tanh_mul / gelu_mul  act(h[:, :F]) * h[:, F:] (gate columns first; gelu_mul
                   is the erf GELU, gelu_tanh_mul its tanh approximation);
      relu / gelu / gelu_tanh              act(h), no gate (DENSE_ACT_DENSE experts);
      swiglu_oai   gpt-oss's `_apply_gate`: gate = h[:, ::2] clamped above at `limit`, up = h[:, 1::2]
                   clamped to [-limit, limit], (up + 1) * gate * sigmoid(alpha * gate).
    """

    kind: str
    alpha: float = 1.0  # swiglu_oai only
    limit: float = float("inf")  # swiglu_oai only

    def __post_init__(self):
        if self.kind not in GATE_KINDS:
            raise ValueError(f"GateSpec kind={self.kind!r}: expected one of {', '.join(GATE_KINDS)}")

    @property
    def gated(self) -> bool:
        """True if the gate halves its input (gate and up columns), False for a plain activation."""
        return self.kind in _GATED_KINDS


# transformers.activations classes by name (matched by name and module, so that describing an
# activation never imports transformers) -> the activation they compute.
_TRANSFORMERS_ACTIVATIONS = {"SiLUActivation": "silu", "GELUActivation": "gelu", "GELUTanh": "gelu_tanh",
                             "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
                             "FastGELUActivation": "gelu_tanh"}


def _activation_kind(act_fn: object) -> str | None:
    """"silu", "gelu" (erf), "gelu_tanh" or "relu" for an activation module or function known to
    compute it, else None (GateSpec users check the answer numerically: see gate_spec)."""
    if isinstance(act_fn, nn.SiLU) or act_fn is nn.functional.silu:
        return "silu"
    if isinstance(act_fn, nn.ReLU) or act_fn in (nn.functional.relu, torch.relu):
        return "relu"
    if isinstance(act_fn, nn.GELU):
        return "gelu_tanh" if act_fn.approximate == "tanh" else "gelu"
    if act_fn is nn.functional.gelu:
        return "gelu"
    cls = type(act_fn)
    if cls.__module__ == "transformers.activations":
        return _TRANSFORMERS_ACTIVATIONS.get(cls.__name__)
    return None


def gate_spec(spec: ArchSpec, experts_module: nn.Module) -> GateSpec | None:
    """The GateSpec of `apply_gate_fn(spec, experts_module)`, or None when its activation is not
    one a GateSpec describes. Recognised by class: a caller running the spec in place of the
    model's gate must check that both agree numerically (offload_moe.quant.moe_kernel.gate_matches)."""
    if spec.kind is ExpertsKind.TRANSPOSED:
        alpha, limit = getattr(experts_module, "alpha", None), getattr(experts_module, "limit", None)
        if not isinstance(alpha, (int, float)) or not isinstance(limit, (int, float)):
            return None
        return GateSpec("swiglu_oai", float(alpha), float(limit))
    if spec.kind is ExpertsKind.DENSE_ACT_DENSE:
        act = _activation_kind(experts_module["expert_0"].act)
        return None if act is None else GateSpec(act)
    act_fn = experts_module.mlp.activation_fn if spec.kind is ExpertsKind.DBRX else experts_module.act_fn
    kind = f"{_activation_kind(act_fn)}_mul"
    return GateSpec(kind) if kind in GATE_KINDS else None  # no gated relu kind


def matrix_fields(fields: dict[str, torch.Tensor], matrix: str) -> dict[str, torch.Tensor]:
    """The fields of one matrix ("gate_up" or "down") of an expert's prefixed field dict
    ("gate_up.qweight" -> "qweight")."""
    prefix = matrix + "."
    return {name[len(prefix) :]: t for name, t in fields.items() if name.startswith(prefix)}
