"""Per-architecture facts: where the experts module sits and what its weights are called on disk.

transformers 5.x folds a checkpoint's per-expert tensors into fused 3-D parameters
(`gate_up_proj [E, 2F, H]`, rows [:F] = gate/w1, [F:] = up/w3; `down_proj [E, H, F]`).
Checkpoints on disk keep the per-expert names. This module is the one table of those names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """How one model family lays out its experts.

    moe_attr: attribute path from a decoder layer to its sparse-MoE block (in the HF model).
    disk_moe_prefix: the MoE block's name on disk, with `{layer}`.
    disk_expert_names: role -> on-disk name of one expert's weight, relative to the block,
        with `{expert}`; roles are "gate" [F, H], "up" [F, H], "down" [H, F].
    renames: (on-disk fragment, in-model fragment) pairs for the non-expert weights.
    num_experts_key / intermediate_key: config attributes.
    """

    model_type: str
    moe_attr: str
    disk_moe_prefix: str
    disk_expert_names: dict[str, str]
    renames: tuple[tuple[str, str], ...]
    num_experts_key: str
    intermediate_key: str

    def disk_expert_name(self, layer: int, expert: int, role: str) -> str:
        prefix = self.disk_moe_prefix.format(layer=layer)
        return f"{prefix}.{self.disk_expert_names[role].format(expert=expert)}"

    def model_name(self, disk_name: str) -> str:
        """In-model parameter name of a non-expert tensor stored under `disk_name`."""
        for old, new in self.renames:
            disk_name = disk_name.replace(old, new)
        return disk_name

    def disk_name(self, model_name: str) -> str:
        """On-disk name of a non-expert parameter called `model_name` in the HF model."""
        for old, new in self.renames:
            model_name = model_name.replace(new, old)
        return model_name

    def is_expert_name(self, disk_name: str) -> bool:
        return ".experts." in disk_name

    def moe_layers(self, config) -> list[int]:
        """Indices of the decoder layers whose MLP is a sparse MoE block."""
        return list(range(config.num_hidden_layers))

    def router_probs(self, gate: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Probabilities [T, E] the MoE block's router `gate` gives tokens `hidden` [T, H]
        (for prefetch and policies; the routing itself always runs the model's own router)."""
        return torch.softmax(nn.functional.linear(hidden, gate.weight).float(), dim=-1)

    def num_experts(self, config) -> int:
        return int(getattr(config, self.num_experts_key))

    def intermediate_size(self, config) -> int:
        return int(getattr(config, self.intermediate_key))


MIXTRAL = ArchSpec(
    model_type="mixtral",
    moe_attr="mlp",
    disk_moe_prefix="model.layers.{layer}.block_sparse_moe",
    disk_expert_names={
        "gate": "experts.{expert}.w1.weight",
        "up": "experts.{expert}.w3.weight",
        "down": "experts.{expert}.w2.weight",
    },
    renames=((".block_sparse_moe.", ".mlp."),),
    num_experts_key="num_local_experts",
    intermediate_key="intermediate_size",
)

ARCHITECTURES: dict[str, ArchSpec] = {spec.model_type: spec for spec in (MIXTRAL,)}


def arch_for(config, config_path: Path | str = "config.json") -> ArchSpec:
    """The ArchSpec of a transformers config, or a clear refusal."""
    model_type = getattr(config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"{config_path}: model_type {model_type!r} is not supported yet (supported: {supported})"
        ) from None
