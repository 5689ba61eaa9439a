"""The one wiring point: checkpoint + config -> HF model on the meta device -> offloaded model.

`load_offloaded` is a sequence of steps of one job each, every check before any long work:
1. `open_checkpoint`: config.json and shard headers (no weights), the meta model, its ArchSpec,
   the checkpoint-name map, and every tensor the model needs checked on disk (shapes);
2. `resolve_expert_source` (checkpoint.expert_sources): the experts' source kind and format,
   decided once (GPTQ, converted, explicit, automatic);
3. `plan_slots_per_layer`: device slots per MoE layer, from slots_per_layer or a gpu_memory budget;
4. `load_non_experts`: the non-expert weights onto the device (attention quantized, and on the
   CPU offload_moe's dense kernels and fp32 attention math, as the config asks);
5. `build_store`: every expert into the host ExpertStore (RAM, or memory-mapped beyond cpu_memory),
   by the source's strategy;
6. `wire_layers`: each MoE layer's `experts` replaced by a complete OffloadedExperts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from offload_moe.checkpoint.expert_sources import ExpertSource, SourceKind, resolve_expert_source
from offload_moe.checkpoint.names import CheckpointMap, build_checkpoint_map
from offload_moe.checkpoint.reader import Checkpoint
from offload_moe.checkpoint.converted import is_converted
from offload_moe.checkpoint.validate import (
    describe_checkpoint_model, expected_tensors, gptq_config_of, read_weight, tied_keys, validate_checkpoint,
)
from offload_moe.config import OffloadConfig
from offload_moe.errors import CheckpointError, ConfigError
from offload_moe.model.arch import ArchSpec, GateSpec, apply_gate_fn, router_probs
from offload_moe.planning.budget import kv_cache_bytes, non_expert_bytes, plan_slots
from offload_moe.model.fp32_attention import use_fp32_attention
from offload_moe.quant.cpu_attention import use_fast_attention
from offload_moe.quant.cpu_linear import use_fast_linears
from offload_moe.quant.cpu_norm import use_fast_norms
from offload_moe.quant.cpu_router import use_fast_routers
from offload_moe.quant.dense_matmul import Workspace
from offload_moe.quant.formats import FormatKind, QuantFormat, parse_attention_format, parse_format
from offload_moe.quant.matmul import cpu_int4_block_n
from offload_moe.quant.moe_kernel import verified_gate_spec
from offload_moe.quant.quantized_linear import quantize_attention
from offload_moe.runtime.cache import ExpertCache
from offload_moe.runtime.disk_store import cpu_slots_for_mapped_store, make_store
from offload_moe.runtime.expert_compute import expert_forward
from offload_moe.runtime.fused_torch import DequantTile, fused_layout_problem, planned_tile_bytes, tile_capacity
from offload_moe.runtime.hybrid import HybridCostModel, calibrate
from offload_moe.runtime.offloaded_experts import OffloadedExperts, PrefetchTarget, RouterLogits, SlotPool
from offload_moe.runtime.policies import make_policy
from offload_moe.runtime.routing_recorder import RoutingRecorder
from offload_moe.runtime.schedule import wants_routing
from offload_moe.runtime.store import ExpertLayout, ExpertStore
from offload_moe.runtime.transfer import TransferEngine, make_transfer_engine



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

    def close(self) -> None:
        """Finish pending copies, stop the transfer engine, close the routing file and drop the
        host store and slot buffers (pinned memory included). The model cannot run afterwards."""
        self.engine.synchronize()
        self.engine.close()
        if self.recorder is not None:
            self.recorder.close()
        for module in self.experts.values():
            module.release()
        self.store.release()


@dataclass
class OpenedCheckpoint:
    """A checkpoint read as far as headers go, with the meta model it fills."""

    ckpt: Checkpoint
    config: object  # the transformers config
    model: nn.Module  # parameters on the meta device
    spec: ArchSpec
    cmap: CheckpointMap
    expected: dict[str, tuple[str, tuple[int, ...]]]  # non-expert model key -> (disk name, shape)


def open_checkpoint(path: str | Path, dtype: torch.dtype) -> OpenedCheckpoint:
    """Step 1: headers, meta model, names; every non-expert tensor checked (experts: step 2)."""
    ckpt = Checkpoint(path)
    config = ckpt.load_config()
    model, spec = describe_checkpoint_model(ckpt, config, dtype)
    cmap = build_checkpoint_map(ckpt, model, spec)
    return OpenedCheckpoint(ckpt, config, model, spec, cmap, expected_tensors(model, config, spec, cmap, ckpt))


def resolve_source(opened: OpenedCheckpoint, cfg: OffloadConfig) -> ExpertSource:
    """Step 2: the experts' source and format, with every expert tensor checked on disk."""
    ckpt, spec = opened.ckpt, opened.spec
    gptq = gptq_config_of(ckpt, opened.config)
    if gptq is not None and not spec.gated:  # GPTQ names gate/up/down per expert
        raise CheckpointError(f"{ckpt.path}: GPTQ experts are read for the fused (Mixtral-style) layout only, "
                              f"not {spec.model_type}'s non-gated ones")
    validate_checkpoint(ckpt, opened.expected, opened.cmap, spec, experts=not is_converted(ckpt.path), gptq=gptq)
    source = resolve_expert_source(ckpt, opened.cmap, spec, gptq, cfg.experts, cfg.dtype, cfg.optimize,
                                   cfg.cpu_memory)
    if source.fmt.quantized and cfg.device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{ckpt.path}: {source.fmt.name} experts run on the CPU or CUDA, not {cfg.device.type}")
    return source


def dequant_tile(opened: OpenedCheckpoint, source: ExpertSource, cfg: OffloadConfig, num_slots: int) -> DequantTile | None:
    """Quantized experts on a GPU: the one dequantization tile every layer's fused call shares
    (GPU slots keep the store's CPU layout, which runtime.fused_torch dequantizes on the device);
    refuses a layout this host cannot read back. None elsewhere."""
    spec, fmt = opened.spec, source.fmt
    if not fmt.quantized or cfg.device.type != "cuda":
        return None
    problem = fused_layout_problem(fmt, spec.hidden, spec.intermediate, spec.gated, cpu_int4_block_n())
    if problem is not None:
        raise ConfigError(f"{opened.ckpt.path}: {fmt.name} experts cannot be computed from GPU slots: {problem}; "
                          "use device='cpu', experts='nf4' or unquantized experts")
    return DequantTile.allocate(fmt, spec.hidden, spec.intermediate, spec.gated, tile_capacity(spec.top_k, num_slots),
                                cfg.dtype, cfg.device)


def plan_slots_per_layer(opened: OpenedCheckpoint, cfg: OffloadConfig, layout: ExpertLayout, fmt: QuantFormat) -> int:
    """Step 3: slots per MoE layer, from slots_per_layer or from the gpu_memory budget (on a GPU,
    next to the fused path's dequantization tile for quantized experts)."""
    spec = opened.spec
    if cfg.gpu_memory is None:
        return cfg.slots_for(spec.num_experts)
    size = cfg.dtype.itemsize
    tile = 0 if cfg.device.type != "cuda" else planned_tile_bytes(fmt, spec.hidden, spec.intermediate, spec.gated,
                                                                   spec.top_k, cfg.dtype)
    return plan_slots(cfg.gpu_memory, non_expert_bytes(opened.expected, size),
                      kv_cache_bytes(opened.config, cfg.context, size), layout.nbytes, len(spec.moe_layers),
                      spec.num_experts, tile).slots_per_layer


def load_non_experts(opened: OpenedCheckpoint, source: ExpertSource, cfg: OffloadConfig) -> None:
    """Step 4: every non-expert weight onto the device, checked complete before the experts."""
    model, spec, ckpt = opened.model, opened.spec, opened.ckpt
    declared = model.state_dict(keep_vars=True)
    state = {
        name: read_weight(ckpt, disk_name, source.gptq).to(device=cfg.device, dtype=declared[name].dtype)
        for name, (disk_name, _) in opened.expected.items()
    }
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(opened.config.get_text_config(), "tie_word_embeddings", False) or tied_keys(model):
        model.tie_weights()
    experts_prefixes = tuple(layer.experts_path + "." for layer in spec.layers)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(experts_prefixes)]
    if leftover:  # before the long expert loading
        raise CheckpointError(f"{ckpt.path}: no weights loaded for {leftover[:5]}")
    workspace = Workspace()  # one scratch buffer for every CPU linear of the model
    if cfg.attention is not None:
        quantize_attention(model, parse_attention_format(cfg.attention), cfg.optimize, workspace)
    if cfg.fast_dense(source.fmt.quantized):
        use_fast_linears(model, workspace)
        use_fast_norms(model, cfg.dtype)
        use_fast_routers(model, workspace)
        use_fp32_attention(model)
        use_fast_attention(model, cfg.dtype)


def build_store(opened: OpenedCheckpoint, source: ExpertSource, cfg: OffloadConfig, layout: ExpertLayout,
                progress: bool) -> ExpertStore:
    """Step 5: the host store, in RAM or memory-mapped from disk beyond cpu_memory, filled by the
    source's strategy (a mapped store already on disk is reused)."""
    spec, fmt = opened.spec, source.fmt
    key_fields = {
        "format": fmt.name if fmt.quantized else str(cfg.dtype).removeprefix("torch."),
        "optimize": source.optimize if source.kind is SourceKind.CHECKPOINT else None,
        "int4_block_n": cpu_int4_block_n() if fmt.kind is FormatKind.AFFINE else None,
    }
    return make_store(
        opened.ckpt.path, layout, spec.moe_layers, spec.num_experts,
        fill=lambda store: source.fill(opened.ckpt, opened.cmap, spec, store.views, progress),
        cpu_memory=cfg.cpu_memory, pin=cfg.pin_memory and cfg.device.type == "cuda",
        converted=source.kind is SourceKind.CONVERTED, key_fields=key_fields,
    )


@dataclass(frozen=True)
class Wiring:
    """What every offloaded layer of one model shares."""

    store: ExpertStore
    engine: TransferEngine
    fmt: QuantFormat
    num_slots: int
    policy: str
    device: torch.device
    prefetch_top_n: int
    hybrid: HybridCostModel | None
    recorder: RoutingRecorder | None
    tile: DequantTile | None
    gate: GateSpec | None


def wire_layers(model: nn.Module, spec: ArchSpec, w: Wiring) -> dict[int, OffloadedExperts]:
    """Step 6: replace each MoE layer's experts, last layer first so each module is complete when
    built (its prefetch target, the next layer, already exists). The prefetch target is the next
    MoE layer of the same stack: an encoder's last layer does not predict the decoder's first."""
    experts: dict[int, OffloadedExperts] = {}
    next_target: PrefetchTarget | None = None
    for position, moe_layer in reversed(list(enumerate(spec.layers))):
        if position + 1 < len(spec.layers) and spec.layers[position + 1].stack != moe_layer.stack:
            next_target = None
        block = model.get_submodule(moe_layer.block_path)
        attr = moe_layer.experts_path.rpartition(".")[2]
        router = model.get_submodule(moe_layer.router_path) if moe_layer.router_path else None
        cache = ExpertCache(spec.num_experts, w.num_slots, make_policy(w.policy))
        tap = None
        if router is not None and (w.recorder is not None or wants_routing(cache)):  # else no one reads the logits
            tap = RouterLogits(spec.num_experts)
            router.register_forward_hook(tap.hook)
        module = OffloadedExperts(
            moe_layer.index, spec.num_experts, apply_gate_fn(spec, getattr(block, attr)), w.store, cache,
            SlotPool(w.store, w.num_slots, w.device), w.engine, fmt=w.fmt, kind=spec.kind, hybrid=w.hybrid,
            tile=w.tile, gate=w.gate, next_layer=next_target, prefetch_top_n=w.prefetch_top_n,
            recorder=w.recorder, router_logits=tap, stack=moe_layer.stack,
            combine_routing=spec.combine_routing, output_scale=spec.output_scale,
        )
        module.preload(list(range(w.num_slots)))  # start warm: experts 0..slots-1
        setattr(block, attr, module)
        experts[moe_layer.index] = module
        next_target = None if router is None else PrefetchTarget(module, functools.partial(router_probs, router))
    return dict(sorted(experts.items()))


def native_gate(opened: OpenedCheckpoint, fmt: QuantFormat) -> GateSpec | None:
    """The experts' gate as the fused CPU kernel computes it, checked once against the model's
    own gate function; None where the kernel does not take these experts (they keep the
    per-expert path)."""
    if fmt.kind is not FormatKind.AFFINE:
        return None
    spec = opened.spec
    return verified_gate_spec(spec, opened.model.get_submodule(spec.layers[0].experts_path))


def _hybrid_model(opened: OpenedCheckpoint, store: ExpertStore, fmt: QuantFormat, engine: TransferEngine,
                  cfg: OffloadConfig) -> HybridCostModel:
    spec = opened.spec
    apply_gate = apply_gate_fn(spec, opened.model.get_submodule(spec.layers[0].experts_path))
    return calibrate(store, spec.moe_layers[0], cfg.device, engine,
                     lambda x, weights: expert_forward(x, weights, fmt, apply_gate, spec.kind), spec.hidden, cfg.dtype)


def load_offloaded(
    path: str | Path, cfg: OffloadConfig, progress: bool = True, record_routing: str | Path | None = None
) -> tuple[nn.Module, Runtime]:
    """Build the offloaded transformers model for the checkpoint at `path`."""
    opened = open_checkpoint(path, cfg.dtype)
    spec = opened.spec
    source = resolve_source(opened, cfg)
    layout = ExpertLayout.for_experts(spec, source.fmt, cfg.dtype)
    num_slots = plan_slots_per_layer(opened, cfg, layout, source.fmt)
    load_non_experts(opened, source, cfg)
    store = build_store(opened, source, cfg, layout, progress)
    opened.ckpt.close()
    use_hybrid = cfg.use_hybrid
    if store.mapped and cfg.device.type == "cpu":  # the slots are RAM too: keep them within the budget
        if cfg.slots_per_layer is None and cfg.gpu_memory is None:
            num_slots = cpu_slots_for_mapped_store(cfg.cpu_memory, layout.nbytes, len(spec.moe_layers), spec.num_experts)
        use_hybrid = cfg.hybrid is not False  # compute misses straight from the mapped store
    engine = make_transfer_engine(cfg.device)
    hybrid = _hybrid_model(opened, store, source.fmt, engine, cfg) if use_hybrid else None
    recorder = RoutingRecorder(record_routing) if record_routing is not None else None
    wiring = Wiring(store, engine, source.fmt, num_slots, cfg.policy, cfg.device, cfg.prefetch_n(spec.top_k),
                    hybrid, recorder, dequant_tile(opened, source, cfg, num_slots), native_gate(opened, source.fmt))
    experts = wire_layers(opened.model, spec, wiring)
    opened.model.to(cfg.device)  # buffers (rotary frequencies) follow the parameters
    opened.model.eval()  # parameters keep requires_grad as transformers leaves them: kernel choices match
    runtime = Runtime(spec=spec, store=store, experts=experts, engine=engine, hybrid=hybrid, recorder=recorder)
    return opened.model, runtime
