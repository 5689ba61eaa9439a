"""Which checkpoint tensors hold which model weights: transformers' own conversion mapping, per key.

Checkpoints on disk use the names the published models use (`block_sparse_moe.experts.3.w1.weight`
for Mixtral, `mlp.experts.3.gate_proj.weight` for Qwen/DeepSeek/OLMoE, fused
`mlp.experts.gate_up_proj` for gpt-oss, `block_sparse_moe.input_linear.weight` for Granite,
`ffn.experts.mlp.w1` for DBRX). transformers 5.x knows how each maps onto its model
(`get_model_conversion_mapping`: renamings plus converters that merge per-expert tensors), so we
apply that mapping key by key, on names only, and never let it materialise a tensor:

* a non-expert tensor maps to one model key;
* an expert tensor maps to (experts parameter, expert, position): per-expert tensors are
  concatenated along rows in the order of the converter's source patterns (gate then up), and a
  fused tensor `[E, ...]` (or DBRX's `[E*F, H]`) contributes its e-th block of rows.

offload_moe's own models of remote-code families (model/deepseek_moe.py, model/llama_moe.py)
bring their mapping (`checkpoint_conversions`), made of the same transformers converters.

GPTQ checkpoints name a linear layer's tensors `<prefix>.qweight` etc. instead of
`<prefix>.weight`; the map is built on the `.weight` names those stand for.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from offload_moe.model.arch import ArchSpec, ExpertsKind
from offload_moe.checkpoint.reader import Checkpoint
from offload_moe.errors import CheckpointError, UnsupportedArchitectureError

GPTQ_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


@dataclass(frozen=True)
class Piece:
    """Rows of one checkpoint tensor: block `block` of `blocks` equal row blocks (0 of 1: all)."""

    disk_name: str
    block: int = 0
    blocks: int = 1


# Which experts-module parameter feeds which of our expert fields, per kind.
FIELD_SOURCES: dict[ExpertsKind, dict[str, tuple[str, ...]]] = {
    ExpertsKind.FUSED: {"gate_up": ("gate_up_proj",), "down": ("down_proj",)},
    ExpertsKind.TRANSPOSED: {
        "gate_up": ("gate_up_proj",), "gate_up_bias": ("gate_up_proj_bias",),
        "down": ("down_proj",), "down_bias": ("down_proj_bias",),
    },
    ExpertsKind.DBRX: {"gate_up": ("mlp.w1", "mlp.v1"), "down": ("mlp.w2",)},
    # Per-expert submodules `expert_<e>.wi` / `.wo`: the model's own names, which are also the
    # published checkpoints' (google/switch-base-8: `encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight`);
    # transformers has no conversion mapping for Switch (get_model_conversion_mapping: generic renamings only).
    ExpertsKind.DENSE_ACT_DENSE: {"gate_up": ("wi.weight",), "down": ("wo.weight",)},
}


def field_sources(spec: ArchSpec) -> dict[str, tuple[str, ...]]:
    """FIELD_SOURCES of `spec`'s kind; for per-expert linears other than Switch's (NLLB-MoE's
    `expert_<e>.fc1` / `.fc2`, with biases: `model.encoder.layers.3.ffn.experts.expert_0.fc1.bias`,
    the model's own names and the published checkpoint's) the spec's own names."""
    if spec.kind is not ExpertsKind.DENSE_ACT_DENSE or (spec.linears == ("wi", "wo") and not spec.expert_bias):
        return FIELD_SOURCES[spec.kind]
    up, down = spec.linears
    sources = {"gate_up": (f"{up}.weight",), "down": (f"{down}.weight",)}
    if spec.expert_bias:
        sources.update({"gate_up_bias": (f"{up}.bias",), "down_bias": (f"{down}.bias",)})
    return sources


_PER_EXPERT_MODULE = re.compile(r"expert_(\d+)\.(.+)")  # "expert_3.wi.weight" -> (3, "wi.weight")


@dataclass
class CheckpointMap:
    """Model key -> disk name for non-expert tensors; (layer, expert, field) -> pieces for experts."""

    non_expert: dict[str, str] = field(default_factory=dict)
    experts: dict[tuple[int, int, str], list[Piece]] = field(default_factory=dict)
    # Per-expert fields merged from several tensors: the disk names all of them should have.
    wanted: dict[tuple[int, int, str], list[str]] = field(default_factory=dict)

    def disk_expert_name(self, layer: int, expert: int, role: str) -> str:
        """The on-disk name of one per-expert matrix, role "gate", "up" or "down" (for GPTQ and
        messages; fused-on-disk experts have no name of their own)."""
        fld, position = {"gate": ("gate_up", 0), "up": ("gate_up", 1), "down": ("down", 0)}[role]
        pieces = self.experts.get((layer, expert, fld), [])
        if position >= len(pieces) or pieces[position].blocks != 1:
            raise CheckpointError(f"layer {layer} expert {expert}: no per-expert {role} tensor in the checkpoint")
        return pieces[position].disk_name


def _weight_name(disk_name: str) -> str:
    """The name a tensor is mapped under: its own, or for GPTQ tensors (`<prefix>.qweight`, ...)
    the `<prefix>.weight` they replace (the GPTQ reader finds the tensors from that name)."""
    for suffix in GPTQ_SUFFIXES:
        if disk_name.endswith(suffix):
            return disk_name[: -len(suffix)] + ".weight"
    return disk_name


def _glob_regex(pattern: str) -> re.Pattern:
    """A converter source pattern (`.experts.*.w1.weight`) as a regex capturing the expert number."""
    literal = pattern.replace("\\.", ".").lstrip("^")
    return re.compile(re.escape(literal).replace("\\*", r"(\d+)"))


def _sibling_name(disk_name: str, pattern: str, other: str, expert: int) -> str:
    """The disk name `other` (a converter source pattern) gives the same expert as `disk_name`."""
    literal = other.replace("\\.", ".").lstrip("^").replace("*", str(expert))
    return _glob_regex(pattern).sub(lambda _: literal, disk_name, count=1)


def _conversions(model: nn.Module) -> tuple[list, list]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    native = getattr(type(model), "checkpoint_conversions", None)  # offload_moe's own models (remote-code families)
    transforms = native() if native is not None else get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def checkpoint_name(model: nn.Module, key: str) -> str:
    """The name transformers would save the non-expert model key `key` under (its renamings
    reversed, as `save_pretrained` does): what an error calls a tensor the checkpoint lacks."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings

    # As save_pretrained: today's names (no legacy renamings), and no prefix to restore on a model
    # built from a config.
    transforms = get_model_conversion_mapping(model, add_legacy=False)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming) and not isinstance(t, PrefixChange)]
    reverse = [r.reverse_transform() for r in renamings[::-1]]
    return apply_renamings(key, [r for r in reverse if isinstance(r, WeightRenaming)])


def _check_merge_ops(converter, where: str) -> None:
    """Only the merge we know: stack experts (MergeModulelist dim 0), then concatenate gate and up."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = converter.operations
    ok = (len(ops) >= 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
          and all(isinstance(op, Concatenate) and op.dim == 1 for op in ops[1:]))
    if not ok:
        raise UnsupportedArchitectureError(
            f"{where}: checkpoint conversion {converter.source_patterns} -> {converter.target_patterns} uses operations "
            f"{[type(op).__name__ for op in ops]} that offload_moe does not apply"
        )


def build_checkpoint_map(ckpt: Checkpoint, model: nn.Module, spec: ArchSpec) -> CheckpointMap:
    """Map every tensor of `ckpt` onto `model` (built on meta) by name; shapes are not checked here."""
    from transformers.core_model_loading import apply_renamings

    renamings, converters = _conversions(model)
    experts_paths = {layer.experts_path: layer.index for layer in spec.layers}
    param_to_fields: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for fld, params in field_sources(spec).items():
        for position, param in enumerate(params):
            param_to_fields[param].append((fld, position))
    model_keys = set(model.state_dict().keys())

    cmap = CheckpointMap()
    pieces: dict[tuple[int, int, str], dict[int, Piece]] = defaultdict(dict)
    for disk_name in sorted({_weight_name(name) for name in ckpt.tensors}):
        renamed = apply_renamings(disk_name, renamings)
        matched = None
        for converter in converters:
            target, pattern = converter.rename_source_key(renamed)
            if pattern is not None:
                matched = (converter, target, pattern)
                break
        target = renamed if matched is None else matched[1]
        owner = next((p for p in experts_paths if target.startswith(p + ".")), None)
        if owner is None:
            if matched is not None:
                raise UnsupportedArchitectureError(
                    f"{ckpt.path}: model_type {spec.model_type!r} is not supported: tensor {disk_name!r} needs "
                    f"transformers' conversion {matched[2]!r}, which offload_moe applies to experts only"
                )
            if target not in model_keys:
                # Not the model's (e.g. an extra head); ignored as transformers would warn and skip.
                continue
            cmap.non_expert[target] = disk_name
            continue
        layer = experts_paths[owner]
        param = target[len(owner) + 1:]
        if spec.kind is ExpertsKind.DENSE_ACT_DENSE and _per_expert_module(pieces, layer, param, param_to_fields, disk_name):
            continue
        if param not in param_to_fields:
            raise UnsupportedArchitectureError(f"{ckpt.path}: tensor {disk_name!r} maps to unknown expert weight {param!r}")
        if matched is not None:
            converter, _, pattern = matched
            _check_merge_ops(converter, f"{ckpt.path}: model_type {spec.model_type!r} is not supported")
            found = _glob_regex(pattern).search(renamed)
            if found is None:
                raise CheckpointError(f"{ckpt.path}: cannot tell which expert tensor {disk_name!r} belongs to")
            expert = int(found.group(1))
            patterns = list(converter.source_patterns)
            position = patterns.index(pattern)
            for fld, _ in param_to_fields[param]:
                pieces[(layer, expert, fld)][position] = Piece(disk_name)
                cmap.wanted[(layer, expert, fld)] = [_sibling_name(disk_name, pattern, p, expert) for p in patterns]
        else:  # fused on disk: every expert is a block of rows
            for expert in range(spec.num_experts):
                for fld, position in param_to_fields[param]:
                    pieces[(layer, expert, fld)][position] = Piece(disk_name, expert, spec.num_experts)
    for key, by_position in pieces.items():
        cmap.experts[key] = [by_position[p] for p in sorted(by_position)]
    return cmap


def _per_expert_module(pieces: dict, layer: int, param: str, param_to_fields: dict, disk_name: str) -> bool:
    """Record a tensor of a per-expert submodule ("expert_3.wi.weight") as that expert's piece;
    False when `param` is not one."""
    found = _PER_EXPERT_MODULE.fullmatch(param)
    if found is None or found.group(2) not in param_to_fields:
        return False
    for fld, position in param_to_fields[found.group(2)]:
        pieces[(layer, int(found.group(1)), fld)][position] = Piece(disk_name)
    return True


def expected_expert_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Field -> per-expert shape in the model's orientation (what the pieces must add up to)."""
    return {name: shape for name, shape, _ in spec.dense_fields(torch.float32)}


def validate_experts(ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, layers: list[int] | None = None) -> None:
    """Every expert of every MoE layer has all its fields on disk with the right shapes (headers
    only); an error names the missing or misshapen tensor. GPTQ tensors are checked by the GPTQ
    reader instead."""
    shapes = expected_expert_shapes(spec)
    for layer in layers if layers is not None else spec.moe_layers:
        for expert in range(spec.num_experts):
            for fld, shape in shapes.items():
                key = (layer, expert, fld)
                got = cmap.experts.get(key)
                if not got:
                    raise CheckpointError(
                        f"{ckpt.path}: layer {layer} expert {expert}: weights for {fld!r} are missing from the checkpoint"
                    )
                wanted = cmap.wanted.get(key, [])
                present = {p.disk_name for p in got}
                for name in wanted:
                    if name not in present:
                        raise CheckpointError(f"{ckpt.path}: tensor {name!r} is missing from the checkpoint")
                if any(p.disk_name not in ckpt.tensors for p in got):
                    continue  # GPTQ: checked by the GPTQ reader
                for piece in got:
                    _check_piece(ckpt, piece, shape, len(got))


def _check_piece(ckpt: Checkpoint, piece: Piece, shape: tuple[int, ...], pieces: int) -> None:
    """A tensor gives one expert's field `shape` as one of `pieces` row blocks (per-expert tensors)
    or as its block `piece.block` (fused [E, *shape] or DBRX's [E*rows, ...])."""
    info = ckpt.info(piece.disk_name)
    ckpt.check_floating(piece.disk_name, "expert weights")
    rows = shape[0] // pieces
    if piece.blocks == 1:
        want = (rows, *shape[1:])
    elif len(info.shape) == len(shape) + 1:
        want = (piece.blocks, rows, *shape[1:])
    else:
        want = (piece.blocks * rows, *shape[1:])
    if tuple(info.shape) != want:
        raise CheckpointError(
            f"{info.file}: tensor {piece.disk_name!r} has shape {list(info.shape)}, expected {list(want)} from config.json"
        )


def read_expert_fields(ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert's fields, in the model's orientation (see ArchSpec), read from disk."""
    out = {}
    for fld, shape in expected_expert_shapes(spec).items():
        parts = [ckpt.read_block(p.disk_name, p.block, p.blocks) for p in cmap.experts[(layer, expert, fld)]]
        parts = [t.reshape(-1, *shape[1:]) if len(shape) > 1 else t.reshape(-1) for t in parts]
        out[fld] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out
