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
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from offload_moe.model.arch import ArchSpec, ExpertsKind, apply_gate_fn, router_probs
from offload_moe.runtime.cache import ExpertCache
from offload_moe.runtime.policies import make_policy
from offload_moe.checkpoint.reader import Checkpoint
from offload_moe.checkpoint.names import CheckpointMap, build_checkpoint_map, read_expert_fields
from offload_moe.config import OffloadConfig
from offload_moe.convert import expert_file_name, is_converted
from offload_moe.checkpoint.converted import check_converted_experts, quantize_expert, read_manifest
from offload_moe.runtime.disk_store import cpu_slots_for_mapped_store, make_store
from offload_moe.errors import CheckpointError, ConfigError
from offload_moe.runtime.offloaded_experts import OffloadedExperts, PrefetchTarget, SlotPool
from offload_moe.checkpoint.gptq import GptqConfig, gptq_to_affine, read_gptq_expert
from offload_moe.runtime.hybrid import HybridCostModel, calibrate
from offload_moe.runtime.expert_compute import expert_forward
from offload_moe.quant.matmul import cpu_int4_block_n, expert_fields, prepare_expert_for_cpu
from offload_moe.quant.cuda_int4 import expert_slot_preparer
from offload_moe.quant.quantized_linear import quantize_attention
from offload_moe.quant.quantize import QTensor, QuantFormat, check_shape, pack, packed_fields, parse_format
from offload_moe.planning.planner import kv_cache_bytes, non_expert_bytes, plan_slots
from offload_moe.runtime.routing_recorder import RoutingRecorder
from offload_moe.runtime.store import ExpertLayout, ExpertStore
from offload_moe.runtime.transfer import TransferEngine, make_transfer_engine
from offload_moe.checkpoint.validate import describe_checkpoint_model, expected_tensors, gptq_config_of, read_weight, validate_checkpoint


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


def _gptq_expert(ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, layer: int, expert: int,
                 gptq: GptqConfig) -> dict | None:
    """One GPTQ expert as our affine QTensors ("gate_up" fused, "down"), or None when its
    layout has no exact affine form (act-order, 8-bit)."""
    h, f = spec.hidden, spec.intermediate
    shapes = {"gate": (f, h), "up": (f, h), "down": (h, f)}
    qts = {}
    for role in ("gate", "up", "down"):
        t = read_gptq_expert(ckpt, cmap, layer, expert, role, config=gptq, shape=shapes[role])
        qts[role] = gptq_to_affine(t.qweight, t.qzeros, t.scales, t.g_idx, gptq.bits, gptq.group_size,
                                   zero_offset=gptq.zero_offset, name=t.prefix)
        if qts[role] is None:
            return None
    gate, up = qts["gate"], qts["up"]
    gate_up = QTensor(gate.fmt, (gate.shape[0] + up.shape[0], gate.shape[1]), torch.cat([gate.codes, up.codes]),
                      torch.cat([gate.scale, up.scale]), torch.cat([gate.zero, up.zero]))
    return {"gate_up": gate_up, "down": qts["down"]}


def _layers_bar(store: ExpertStore, desc: str, progress: bool) -> Iterable[int]:
    return tqdm(store.layers, desc=desc, unit="layer") if progress else store.layers


def _fill_store_from_gptq(
    ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, store: ExpertStore, fmt: QuantFormat | None,
    gptq: GptqConfig, progress: bool,
) -> None:
    """GPTQ experts: converted exactly to our affine format (fmt), or dequantized (fmt None)."""
    if spec.kind is not ExpertsKind.FUSED:
        raise CheckpointError(f"{ckpt.path}: GPTQ experts are read for the fused (Mixtral-style) layout only")
    block_n = cpu_int4_block_n() if fmt is not None else None
    for layer in _layers_bar(store, f"experts -> host store (gptq {gptq.bits}-bit)", progress):
        for expert in range(store.num_experts):
            views = store.views(layer, expert)
            if fmt is None:
                for matrix, roles in (("gate_up", ("gate", "up")), ("down", ("down",))):
                    views[matrix].copy_(torch.cat([
                        read_weight(ckpt, cmap.disk_expert_name(layer, expert, r), gptq) for r in roles]))
                continue
            qts = _gptq_expert(ckpt, cmap, spec, layer, expert, gptq)
            if qts is None or qts["down"].fmt != fmt or qts["gate_up"].fmt != fmt:
                raise CheckpointError(f"{ckpt.path}: layer {layer} expert {expert} is not in the GPTQ layout of the others")
            packed = {f"{m}.{k}": v for m, qt in qts.items() for k, v in pack(qt).items()}
            prepare_expert_for_cpu(packed, fmt, spec.hidden, spec.intermediate, dest=views, block_n=block_n)


def _store_expert(views: dict[str, torch.Tensor], fields: dict[str, torch.Tensor], spec: ArchSpec,
                  fmt: QuantFormat | None, optimize: bool, block_n: int | None) -> None:
    """One expert's fields (model orientation, from disk) into its store buffer, quantized if asked."""
    if fmt is None:
        for name, tensor in fields.items():
            views[name].copy_(tensor)
        return
    canonical = spec.canonical(fields)
    packed = quantize_expert({m: canonical[m] for m in ("gate_up", "down")}, fmt, optimize)
    prepare_expert_for_cpu(packed, fmt, spec.hidden, spec.intermediate, dest=views, block_n=block_n)
    for name in canonical:
        if name.endswith("_bias"):
            views[name].copy_(canonical[name])


def _fill_store(
    ckpt: Checkpoint, cmap: CheckpointMap, spec: ArchSpec, store: ExpertStore, progress: bool,
    fmt: QuantFormat | None = None, optimize: bool = False,
) -> None:
    """Read every expert into its store buffer, quantizing on the fly when `fmt` is given."""
    block_n = cpu_int4_block_n() if fmt is not None and fmt.kind == "affine" else None
    desc = "experts -> host store" + (f" ({fmt.name})" if fmt is not None else "")
    for layer in _layers_bar(store, desc, progress):
        for expert in range(store.num_experts):
            fields = read_expert_fields(ckpt, cmap, spec, layer, expert)
            _store_expert(store.views(layer, expert), fields, spec, fmt, optimize, block_n)


def _fill_store_from_converted(path: Path, spec: ArchSpec, store: ExpertStore, fmt: QuantFormat, progress: bool) -> None:
    """Packed experts from a converted directory (no re-quantization; only the CPU kernel's
    re-layout runs)."""
    hidden, ffn = spec.hidden, spec.intermediate
    block_n = cpu_int4_block_n() if fmt.kind == "affine" else None
    names = [f"gate_up.{n}" for n, _, _ in packed_fields(fmt, 2 * ffn, hidden)]
    names += [f"down.{n}" for n, _, _ in packed_fields(fmt, hidden, ffn)]
    biases = [name for name, _, _ in spec.bias_fields(torch.float32)]
    for layer in _layers_bar(store, f"experts -> host store ({fmt.name}, converted)", progress):
        file = path / expert_file_name(layer)
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for expert in range(store.num_experts):
                try:
                    fields = {n: f.get_tensor(f"{expert}.{n}") for n in names + biases}
                except Exception as exc:  # safetensors raises its own error types
                    raise CheckpointError(f"{file}: expert {expert} is incomplete ({exc})") from None
                views = store.views(layer, expert)
                prepare_expert_for_cpu({n: fields[n] for n in names}, fmt, hidden, ffn, dest=views, block_n=block_n)
                for name in biases:
                    views[name].copy_(fields[name])


AUTO_FORMAT = "hqq4"
RAM_HEADROOM = 0.8  # of the free host RAM, for 16-bit experts before they are quantized by default


def auto_expert_format(spec: ArchSpec, cfg: OffloadConfig, where: str) -> QuantFormat | None:
    """The expert format when none was asked for: the checkpoint's own (exact) when its experts fit
    the free host RAM, else hqq4, quantized while loading, with a warning that says so. With an
    explicit `cpu_memory` budget nothing is quantized unasked: what does not fit is served from disk."""
    if cfg.cpu_memory is not None:
        return None
    import psutil

    dense = len(spec.layers) * spec.num_experts * ExpertLayout(spec.dense_fields(cfg.dtype)).nbytes
    free = psutil.virtual_memory().available
    if dense <= RAM_HEADROOM * free:
        return None
    fmt = parse_format(AUTO_FORMAT)
    try:
        for out_f, in_f in ((2 * spec.intermediate, spec.hidden), (spec.hidden, spec.intermediate)):
            check_shape(fmt, out_f, in_f)
    except ConfigError:
        return None  # shapes hqq4's groups do not divide: keep 16-bit (and the disk spill, if set)
    warnings.warn(
        f"{where}: the experts take {dense / 2**30:.1f} GiB at 16 bits, more than the free host RAM "
        f"({free / 2**30:.1f} GiB) allows; quantizing them to {AUTO_FORMAT} while loading (exact logits need "
        f"experts='{str(cfg.dtype).removeprefix('torch.')}' with enough RAM, or cpu_memory= to serve them from disk)",
        stacklevel=3,
    )
    return fmt


def _keep_router_logits(module: OffloadedExperts):
    def hook(router: nn.Module, args: tuple, output) -> None:
        logits = output[0] if isinstance(output, tuple) else output
        if isinstance(logits, torch.Tensor) and logits.shape[-1] == module.num_experts:
            module.router_logits = logits.reshape(-1, module.num_experts)  # [T, E]

    return hook


def load_offloaded(
    path: str | Path, cfg: OffloadConfig, progress: bool = True, record_routing: str | Path | None = None
) -> tuple[nn.Module, Runtime]:
    """Build the offloaded transformers model for the checkpoint at `path`."""
    ckpt = Checkpoint(path)
    config = ckpt.load_config()
    model, spec = describe_checkpoint_model(ckpt, config, cfg.dtype)
    num_experts, moe_layers = spec.num_experts, spec.moe_layers
    cmap = build_checkpoint_map(ckpt, model, spec)
    expected = expected_tensors(model, config, spec, cmap, ckpt)
    converted = read_manifest(ckpt.path) if is_converted(ckpt.path) else None
    gptq = gptq_config_of(ckpt, config)
    validate_checkpoint(ckpt, expected, cmap, spec, experts=converted is None, gptq=gptq)
    fmt = parse_format(cfg.experts) if cfg.experts is not None else None
    if gptq is not None:
        if cfg.experts is not None and cfg.experts != "gptq":
            raise ConfigError(f"{ckpt.path}: a GPTQ checkpoint is served as is; pass experts='gptq' or nothing")
        fmt = None  # dequantized experts unless the GPTQ layout maps exactly onto the int4 kernel
        if not gptq.desc_act and gptq.bits in (2, 3, 4):
            first = _gptq_expert(ckpt, cmap, spec, moe_layers[0], 0, gptq)
            fmt = None if first is None else first["down"].fmt
        if fmt is None:
            warnings.warn(f"{ckpt.path}: GPTQ {gptq.bits}-bit with desc_act={gptq.desc_act} has no exact int4-kernel "
                          f"form here; its experts are dequantized to {cfg.dtype}", stacklevel=2)
    if converted is not None:
        stored = parse_format(converted["experts"]["format"])
        if fmt is not None and fmt != stored:
            raise ConfigError(f"{ckpt.path}: converted with experts={stored.name!r}, not {fmt.name!r}")
        fmt = stored
        check_converted_experts(ckpt.path, moe_layers)
    if cfg.experts is None and gptq is None and converted is None:
        fmt = auto_expert_format(spec, cfg, str(ckpt.path))
    slot_prepare = None  # CUDA int4: the store's CPU layout -> the GPU kernel's, after each copy
    if fmt is not None and fmt.quantized and cfg.device.type != "cpu":
        if cfg.device.type != "cuda":
            raise ConfigError(f"{ckpt.path}: {fmt.name} experts run on the CPU or CUDA, not {cfg.device.type}")
        slot_prepare = expert_slot_preparer(fmt, spec.hidden, spec.intermediate, str(ckpt.path))
    if fmt is not None and fmt.quantized:
        for out_f, in_f in ((2 * spec.intermediate, spec.hidden), (spec.hidden, spec.intermediate)):
            check_shape(fmt, out_f, in_f)  # ConfigError naming the format and the shape, before long work
        layout = ExpertLayout(expert_fields(fmt, spec.hidden, spec.intermediate, prepared=True)
                              + spec.bias_fields(cfg.dtype))
    else:
        fmt = None
        layout = ExpertLayout(spec.dense_fields(cfg.dtype))
    if cfg.gpu_memory is not None:
        size = cfg.dtype.itemsize
        num_slots = plan_slots(cfg.gpu_memory, non_expert_bytes(expected, size), kv_cache_bytes(config, cfg.context, size),
                               layout.nbytes, len(moe_layers), num_experts).slots_per_layer
    else:
        num_slots = cfg.slots_for(num_experts)

    # Non-expert weights, straight to the device.
    declared = model.state_dict(keep_vars=True)
    state = {
        name: read_weight(ckpt, disk_name, gptq).to(device=cfg.device, dtype=declared[name].dtype)
        for name, (disk_name, _) in expected.items()
    }
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    experts_prefixes = tuple(layer.experts_path + "." for layer in spec.layers)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(experts_prefixes)]
    if leftover:  # before the long expert loading below
        raise CheckpointError(f"{ckpt.path}: no weights loaded for {leftover[:5]}")
    if cfg.attention is not None:
        quantize_attention(model, parse_format(cfg.attention), cfg.optimize)

    # Experts: host store (in RAM, or memory-mapped from disk beyond cpu_memory), then one
    # offloaded module per MoE layer.
    def fill(store: ExpertStore) -> None:
        if converted is not None:
            _fill_store_from_converted(ckpt.path, spec, store, fmt, progress)
        elif gptq is not None:
            _fill_store_from_gptq(ckpt, cmap, spec, store, fmt, gptq, progress)
        else:
            _fill_store(ckpt, cmap, spec, store, progress, fmt, cfg.optimize)

    store = make_store(
        ckpt.path, layout, moe_layers, num_experts, fill=fill, cpu_memory=cfg.cpu_memory,
        pin=cfg.pin_memory and cfg.device.type == "cuda", converted=converted is not None,
        key_fields={"format": fmt.name if fmt is not None else str(cfg.dtype).removeprefix("torch."),
                    "optimize": cfg.optimize if converted is None and gptq is None else None,
                    "int4_block_n": cpu_int4_block_n() if fmt is not None and fmt.kind == "affine" else None},
    )
    ckpt.close()
    use_hybrid = cfg.use_hybrid
    if store.mapped and cfg.device.type == "cpu":  # the slots are RAM too: keep them within the budget
        if cfg.slots_per_layer is None and cfg.gpu_memory is None:
            num_slots = cpu_slots_for_mapped_store(cfg.cpu_memory, layout.nbytes, len(moe_layers), num_experts)
        use_hybrid = cfg.hybrid is not False  # compute misses straight from the mapped store
    engine = make_transfer_engine(cfg.device)
    hybrid = None
    if use_hybrid:
        apply_gate = apply_gate_fn(spec, model.get_submodule(spec.layers[0].experts_path))
        hybrid = calibrate(store, moe_layers[0], cfg.device, engine,
                           lambda x, w: expert_forward(x, w, fmt, apply_gate, spec.kind), spec.hidden, cfg.dtype,
                           prepare=slot_prepare)
    recorder = RoutingRecorder(record_routing) if record_routing is not None else None
    experts: dict[int, OffloadedExperts] = {}
    routers: dict[int, nn.Module | None] = {}
    for moe_layer in spec.layers:
        layer = moe_layer.index
        block = model.get_submodule(moe_layer.block_path)
        attr = moe_layer.experts_path.rpartition(".")[2]
        original = getattr(block, attr)
        module = OffloadedExperts(
            layer=layer,
            num_experts=num_experts,
            apply_gate=apply_gate_fn(spec, original),
            store=store,
            cache=ExpertCache(num_experts, num_slots, make_policy(cfg.policy)),
            pool=SlotPool(store, num_slots, cfg.device),
            engine=engine,
            hybrid=hybrid,
            fmt=fmt,
            kind=spec.kind,
            slot_prepare=slot_prepare,
        )
        module.preload(list(range(num_slots)))  # start warm: experts 0..slots-1
        module.recorder = recorder
        setattr(block, attr, module)
        experts[layer] = module
        routers[layer] = model.get_submodule(moe_layer.router_path) if moe_layer.router_path else None
        if routers[layer] is not None and (recorder is not None or hasattr(module.cache.policy, "observe")):
            routers[layer].register_forward_hook(_keep_router_logits(module))
    top_n = cfg.prefetch_top_n
    if top_n is None:  # a copy overlaps compute on a GPU; on the CPU it competes for the same cores
        top_n = spec.top_k if cfg.device.type == "cuda" else 0
    for layer, next_layer in zip(moe_layers, moe_layers[1:]):
        if routers[next_layer] is None:
            continue
        experts[layer].prefetch_target = PrefetchTarget(
            experts[next_layer], functools.partial(router_probs, routers[next_layer])
        )
        experts[layer].prefetch_top_n = top_n

    model.to(cfg.device)  # buffers (rotary frequencies) follow the parameters
    model.eval()  # parameters keep requires_grad as transformers leaves them: kernel choices match
    return model, Runtime(spec=spec, store=store, experts=experts, engine=engine, hybrid=hybrid, recorder=recorder)
