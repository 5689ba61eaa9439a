"""The one wiring point: checkpoint + config -> HF model on the meta device -> offloaded model.

Steps, each failing early with a message naming the file and key at fault:
1. read config.json and shard headers (no weights), pick the ArchSpec;
2. build the transformers model with empty (meta) parameters and real buffers;
3. check every tensor the model needs is on disk with the right shape;
4. load the non-expert weights onto the device, and every expert into the host ExpertStore;
5. replace each MoE layer's `experts` with OffloadedExperts over a preallocated slot pool.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .arch import ArchSpec, arch_for
from .cache import ExpertCache, make_policy
from .checkpoint import Checkpoint
from .config import OffloadConfig
from .convert import (
    check_converted_experts, expert_file_name, expert_matrices, is_converted, quantize_expert, read_manifest,
)
from .errors import CheckpointError, ConfigError
from .experts import OffloadedExperts, PrefetchTarget, SlotPool
from .hybrid import HybridCostModel, calibrate
from .kernels import expert_forward
from .qkernels import cpu_int4_block_n, expert_fields, prepare_expert_for_cpu
from .quant import QuantFormat, packed_fields, parse_format
from .planner import kv_cache_bytes, plan_slots
from .routing import RoutingRecorder
from .store import ExpertLayout, ExpertStore
from .transfer import TransferEngine, make_transfer_engine


@dataclass
class Runtime:
    """Everything the offloaded model owns besides the transformers model itself."""

    spec: ArchSpec
    store: ExpertStore
    experts: dict[int, OffloadedExperts]  # layer -> module
    engine: TransferEngine
    hybrid: HybridCostModel | None = None
    recorder: RoutingRecorder | None = None

    @property
    def device_expert_bytes(self) -> int:
        return sum(m.pool.nbytes for m in self.experts.values())


def _submodule(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def build_empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The transformers model with parameters on the meta device and real (CPU) buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def expected_tensors(model: nn.Module, config, spec: ArchSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Non-expert model parameter name -> (on-disk name, shape)."""
    expected = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, param in model.named_parameters(remove_duplicate=False):
        if ".experts." in name or (tied and name == "lm_head.weight"):
            continue
        expected[name] = (spec.disk_name(name), tuple(param.shape))
    return expected


def validate_checkpoint(
    ckpt: Checkpoint, expected: dict[str, tuple[str, tuple[int, ...]]], config, spec: ArchSpec, experts: bool = True
) -> None:
    """Every tensor the model needs is on disk with the right shape (headers only)."""
    for disk_name, shape in expected.values():
        ckpt.check_shape(disk_name, shape)
    if not experts:
        return
    hidden, ffn = config.hidden_size, spec.intermediate_size(config)
    shapes = {"gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
    for layer in spec.moe_layers(config):
        for expert in range(spec.num_experts(config)):
            for role, shape in shapes.items():
                ckpt.check_shape(spec.disk_expert_name(layer, expert, role), shape)


def _fill_store(
    ckpt: Checkpoint, spec: ArchSpec, config, store: ExpertStore, progress: bool,
    fmt: QuantFormat | None = None, optimize: bool = False,
) -> None:
    """Read every expert into its store buffer, quantizing on the fly when `fmt` is given."""
    hidden, ffn = config.hidden_size, spec.intermediate_size(config)
    block_n = cpu_int4_block_n() if fmt is not None and fmt.kind == "affine" else None
    layers: Iterable[int] = store.layers
    if progress:
        desc = "experts -> host store" + (f" ({fmt.name})" if fmt is not None else "")
        layers = tqdm(layers, desc=desc, unit="layer")
    for layer in layers:
        for expert in range(store.num_experts):
            views = store.views(layer, expert)
            matrices = expert_matrices(ckpt, spec, layer, expert)
            if fmt is None:
                views["gate_up"].copy_(matrices["gate_up"])
                views["down"].copy_(matrices["down"])
                continue
            packed = quantize_expert(matrices, fmt, optimize)
            prepare_expert_for_cpu(packed, fmt, hidden, ffn, dest=views, block_n=block_n)


def _fill_store_from_converted(
    path: Path, config, spec: ArchSpec, store: ExpertStore, fmt: QuantFormat, progress: bool
) -> None:
    """Packed experts from a converted directory (no re-quantization; only the CPU kernel's
    re-layout runs)."""
    hidden, ffn = config.hidden_size, spec.intermediate_size(config)
    block_n = cpu_int4_block_n() if fmt.kind == "affine" else None
    names = [f"gate_up.{n}" for n, _, _ in packed_fields(fmt, 2 * ffn, hidden)]
    names += [f"down.{n}" for n, _, _ in packed_fields(fmt, hidden, ffn)]
    layers: Iterable[int] = store.layers
    if progress:
        layers = tqdm(layers, desc=f"experts -> host store ({fmt.name}, converted)", unit="layer")
    for layer in layers:
        file = path / expert_file_name(layer)
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for expert in range(store.num_experts):
                try:
                    fields = {n: f.get_tensor(f"{expert}.{n}") for n in names}
                except Exception as exc:  # safetensors raises its own error types
                    raise CheckpointError(f"{file}: expert {expert} is incomplete ({exc})") from None
                prepare_expert_for_cpu(fields, fmt, hidden, ffn, dest=store.views(layer, expert), block_n=block_n)


def _keep_router_logits(module: OffloadedExperts):
    def hook(gate: nn.Module, args: tuple, output: tuple) -> None:
        module.router_logits = output[0]  # [T, E]

    return hook


def load_offloaded(
    path: str | Path, cfg: OffloadConfig, progress: bool = True, record_routing: str | Path | None = None
) -> tuple[nn.Module, Runtime]:
    """Build the offloaded transformers model for the checkpoint at `path`."""
    ckpt = Checkpoint(path)
    config = ckpt.load_config()
    spec = arch_for(config, ckpt.config_path)
    num_experts = spec.num_experts(config)
    moe_layers = spec.moe_layers(config)

    model = build_empty_model(config, cfg.dtype)
    expected = expected_tensors(model, config, spec)
    converted = read_manifest(ckpt.path) if is_converted(ckpt.path) else None
    validate_checkpoint(ckpt, expected, config, spec, experts=converted is None)
    fmt = parse_format(cfg.experts) if cfg.experts is not None else None
    if converted is not None:
        stored = parse_format(converted["experts"]["format"])
        if fmt is not None and fmt != stored:
            raise ConfigError(f"{ckpt.path}: converted with experts={stored.name!r}, not {fmt.name!r}")
        fmt = stored
        check_converted_experts(ckpt.path, moe_layers)
    if fmt is not None and fmt.quantized and cfg.device.type != "cpu":
        raise ConfigError(
            f"{ckpt.path}: {fmt.name} experts run on the CPU for now (the CUDA int4 path is not wired yet); "
            "use device='cpu' or unquantized experts"
        )
    if fmt is not None and fmt.quantized:
        layout = ExpertLayout(expert_fields(fmt, config.hidden_size, spec.intermediate_size(config), prepared=True))
    else:
        fmt = None
        layout = ExpertLayout.dense(config.hidden_size, spec.intermediate_size(config), cfg.dtype)
    if cfg.gpu_memory is not None:
        non_expert = sum(math.prod(shape) for _, shape in expected.values()) * cfg.dtype.itemsize
        kv = kv_cache_bytes(config, cfg.context, cfg.dtype.itemsize)
        num_slots = plan_slots(cfg.gpu_memory, non_expert, kv, layout.nbytes, len(moe_layers), num_experts).slots_per_layer
    else:
        num_slots = cfg.slots_for(num_experts)

    # Non-expert weights, straight to the device.
    state = {
        name: ckpt.read(disk_name).to(device=cfg.device, dtype=cfg.dtype) for name, (disk_name, _) in expected.items()
    }
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()

    # Experts: host store, then one offloaded module per MoE layer.
    store = ExpertStore(layout, moe_layers, num_experts, pin=cfg.pin_memory and cfg.device.type == "cuda")
    if converted is not None:
        _fill_store_from_converted(ckpt.path, config, spec, store, fmt, progress)
    else:
        _fill_store(ckpt, spec, config, store, progress, fmt, cfg.optimize)
    ckpt.close()
    engine = make_transfer_engine(cfg.device)
    hybrid = None
    if cfg.use_hybrid:
        act_fn = _submodule(model.model.layers[moe_layers[0]], spec.moe_attr).experts.act_fn
        hybrid = calibrate(store, moe_layers[0], cfg.device, engine,
                           lambda x, w: expert_forward(x, w, fmt, act_fn), config.hidden_size, cfg.dtype)
    recorder = RoutingRecorder(record_routing) if record_routing is not None else None
    experts: dict[int, OffloadedExperts] = {}
    gates: dict[int, nn.Module] = {}
    for layer in moe_layers:
        moe_block = _submodule(model.model.layers[layer], spec.moe_attr)
        act_fn = moe_block.experts.act_fn
        module = OffloadedExperts(
            layer=layer,
            num_experts=num_experts,
            act_fn=act_fn,
            store=store,
            cache=ExpertCache(num_experts, num_slots, make_policy(cfg.policy)),
            pool=SlotPool(store, num_slots, cfg.device),
            engine=engine,
            hybrid=hybrid,
            fmt=fmt,
        )
        module.preload(list(range(num_slots)))  # start warm: experts 0..slots-1
        module.recorder = recorder
        moe_block.experts = experts[layer] = module
        gates[layer] = moe_block.gate
        if recorder is not None or hasattr(module.cache.policy, "observe"):
            moe_block.gate.register_forward_hook(_keep_router_logits(module))
    top_n = cfg.prefetch_top_n
    if top_n is None:  # a copy overlaps compute on a GPU; on the CPU it competes for the same cores
        top_n = getattr(config, "num_experts_per_tok", 2) if cfg.device.type == "cuda" else 0
    for layer, next_layer in zip(moe_layers, moe_layers[1:]):
        experts[layer].prefetch_target = PrefetchTarget(
            experts[next_layer], functools.partial(spec.router_probs, gates[next_layer])
        )
        experts[layer].prefetch_top_n = top_n

    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"{ckpt.path}: no weights loaded for {leftover[:5]}")
    model.to(cfg.device)  # buffers (rotary frequencies) follow the parameters
    model.eval()  # parameters keep requires_grad as transformers leaves them: kernel choices match
    return model, Runtime(spec=spec, store=store, experts=experts, engine=engine, hybrid=hybrid, recorder=recorder)
