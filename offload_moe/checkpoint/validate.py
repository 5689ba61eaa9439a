"""Check a checkpoint against the model it should fill, from headers alone, before long work."""

from __future__ import annotations

import torch
from torch import nn
from offload_moe.checkpoint.gptq import GptqConfig, QUANTIZE_CONFIG_NAME, read_gptq_config, read_gptq_linear
from offload_moe.checkpoint.names import CheckpointMap, checkpoint_name, validate_experts
from offload_moe.checkpoint.reader import Checkpoint
from offload_moe.errors import CheckpointError, UnsupportedArchitectureError
from offload_moe.model.arch import ArchSpec, describe_model
from offload_moe.model.build import build_empty_model


def describe_checkpoint_model(ckpt: Checkpoint, config, dtype: torch.dtype) -> tuple[nn.Module, ArchSpec]:
    """The meta model of a checkpoint's config and its ArchSpec, or a clear refusal."""
    try:
        model = build_empty_model(config, dtype)
    except ValueError as exc:  # transformers: no causal-LM class for this config
        raise UnsupportedArchitectureError(f"{ckpt.config_path}: {exc}".split("\n")[0]) from None
    return model, describe_model(model, str(ckpt.config_path))



def expected_tensors(model: nn.Module, config, spec: ArchSpec, cmap: CheckpointMap | None = None,
                     ckpt: Checkpoint | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Non-expert model key -> (on-disk name, shape): every parameter and every persistent buffer
    (DeepSeek-V3's e_score_correction_bias: left out, it would stay at its zero init and route
    silently wrong). Without a checkpoint map the disk name is the model key (for planning from
    config alone). A tensor missing from the checkpoint is a CheckpointError naming the model key
    and the name transformers would save it under; one stored in an integer or bool dtype where
    the model holds floats is refused too (headers only)."""
    expected = {}
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    experts_prefixes = tuple(layer.experts_path + "." for layer in spec.layers)
    tied_to = tied_keys(model)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(experts_prefixes) or (tied and name == "lm_head.weight") or name in tied_to:
            continue
        if cmap is None:
            expected[name] = (name, tuple(tensor.shape))
            continue
        disk_name = cmap.non_expert.get(name)
        if disk_name is None:
            where = ckpt.path if ckpt is not None else "checkpoint"
            raise CheckpointError(f"{where}: tensor {checkpoint_name(model, name)!r} (the model's {name!r}) is "
                                  "missing from the checkpoint")
        if ckpt is not None and disk_name in ckpt.tensors and tensor.is_floating_point():
            ckpt.check_floating(disk_name, f"the model's {name!r} ({tensor.dtype})")
        expected[name] = (disk_name, tuple(tensor.shape))
    return expected



def tied_keys(model: nn.Module) -> set[str]:
    """Model keys transformers ties to another (`all_tied_weights_keys`, as the config asks:
    Switch's encoder and decoder embeddings and lm_head are `shared.weight`); checkpoints
    saved by transformers leave them out, and `tie_weights()` fills them after loading."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def validate_checkpoint(
    ckpt: Checkpoint, expected: dict[str, tuple[str, tuple[int, ...]]], cmap: CheckpointMap, spec: ArchSpec,
    experts: bool = True, gptq: GptqConfig | None = None,
) -> None:
    """Every tensor the model needs is on disk with the right shape (headers only). With a GPTQ
    config, a linear layer may be stored as GPTQ tensors instead of `.weight`."""
    for disk_name, shape in expected.values():
        _check_weight(ckpt, disk_name, shape, gptq)
    if not experts:
        return
    validate_experts(ckpt, cmap, spec)
    if gptq is not None:
        h, f = spec.hidden, spec.intermediate
        shapes = {"gate": (f, h), "up": (f, h), "down": (h, f)}
        for layer in spec.moe_layers:
            for expert in range(spec.num_experts):
                for role, shape in shapes.items():
                    _check_weight(ckpt, cmap.disk_expert_name(layer, expert, role), shape, gptq)



def _gptq_prefix(ckpt: Checkpoint, disk_name: str, gptq: GptqConfig | None) -> str | None:
    """The GPTQ prefix of `disk_name` when it is stored as GPTQ tensors, else None."""
    if gptq is None or disk_name in ckpt.tensors or not disk_name.endswith(".weight"):
        return None
    prefix = disk_name[: -len(".weight")]
    return prefix if f"{prefix}.qweight" in ckpt.tensors else None



def _check_weight(ckpt: Checkpoint, disk_name: str, shape: tuple[int, ...], gptq: GptqConfig | None) -> None:
    prefix = _gptq_prefix(ckpt, disk_name, gptq)
    if prefix is None:
        ckpt.check_shape(disk_name, shape)
    else:
        read_gptq_linear(ckpt, prefix, config=gptq, shape=shape, read=False)



def read_weight(ckpt: Checkpoint, disk_name: str, gptq: GptqConfig | None) -> torch.Tensor:
    """A dense weight: as stored, or dequantized from its GPTQ tensors."""
    prefix = _gptq_prefix(ckpt, disk_name, gptq)
    if prefix is None:
        return ckpt.read(disk_name)
    return read_gptq_linear(ckpt, prefix).dequantize(gptq.bits, zero_offset=gptq.zero_offset)



def gptq_config_of(ckpt: Checkpoint, config) -> GptqConfig | None:
    """The GPTQ config when the checkpoint is a GPTQ one (quantize_config.json or a
    quantization_config with quant_method "gptq"), else None."""
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if (ckpt.path / QUANTIZE_CONFIG_NAME).is_file() or str(method).lower() == "gptq":
        return read_gptq_config(ckpt.path)
    return None
