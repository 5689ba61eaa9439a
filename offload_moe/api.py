"""The Python API: `load()` a checkpoint and use the OffloadedModel it returns.

>>> import offload_moe
>>> llm = offload_moe.load("path/to/Mixtral-8x7B-Instruct-v0.1", slots_per_layer=4)  # doctest: +SKIP
>>> llm.generate("The capital of France is", max_new_tokens=20)  # doctest: +SKIP
>>> llm.stats()["total"]["hit_rate"]  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import OffloadConfig, resolve_device, resolve_dtype
from .loader import Runtime, load_offloaded


class OffloadedModel:
    """A transformers causal LM whose experts are served from a host store through a device cache.

    `.model` is the transformers model (its own `generate()` works), `.tokenizer` its tokenizer
    (None if the checkpoint has none).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, runtime: Runtime, config: OffloadConfig, path: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.config = config
        self.path = path

    @property
    def device(self) -> torch.device:
        return self.config.device

    def __repr__(self) -> str:
        slots = self.config.slots_per_layer or "all"
        return (
            f"OffloadedModel({str(self.path)!r}, device={self.device}, dtype={self.config.dtype}, "
            f"slots_per_layer={slots}, policy={self.config.policy!r})"
        )

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: the checkpoint has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    @torch.no_grad()
    def generate(self, prompt: str | list[int] | torch.Tensor, **generation_kwargs) -> str | torch.Tensor:
        """Continue `prompt`: text in, new text out; token ids in ([T] or [B, T]), all ids out
        (prompt plus continuation, as transformers' generate() returns them).

        >>> llm.generate("Once upon a time", max_new_tokens=32, do_sample=False)  # doctest: +SKIP
        """
        if isinstance(prompt, str):
            tokenizer = self._require_tokenizer()
            inputs = tokenizer(prompt, return_tensors="pt").to(self.device)
            if tokenizer.pad_token_id is None and "pad_token_id" not in generation_kwargs:
                generation_kwargs["pad_token_id"] = tokenizer.eos_token_id
            out = self.model.generate(**inputs, **generation_kwargs)
            return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        ids = torch.as_tensor(prompt, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        return self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **generation_kwargs)

    def stats(self) -> dict[str, Any]:
        """Expert cache counters: per layer and in total (hits, misses, hit_rate, bytes_copied)."""
        layers = []
        total = {"hits": 0, "misses": 0, "evictions": 0, "bytes_copied": 0}
        for layer, module in sorted(self.runtime.experts.items()):
            row = {"layer": layer, "slots": module.cache.num_slots, **module.cache.stats.as_dict()}
            layers.append(row)
            for key in total:
                total[key] += row[key]
        uses = total["hits"] + total["misses"]
        total["hit_rate"] = total["hits"] / uses if uses else 0.0
        return {
            "layers": layers,
            "total": total,
            "device_expert_bytes": self.runtime.device_expert_bytes,
            "host_expert_bytes": self.runtime.store.nbytes,
        }

    def reset_stats(self) -> None:
        """Zero the cache counters (the cache contents stay)."""
        for module in self.runtime.experts.values():
            module.cache.stats = type(module.cache.stats)()


def load(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    slots_per_layer: int | None = None,
    policy: str = "lru",
    pin_memory: bool = True,
    progress: bool = True,
) -> OffloadedModel:
    """Load a Hugging Face MoE checkpoint directory with its experts offloaded.

    device: "cuda", "cpu" or None (CUDA when available). dtype: compute dtype of the
    non-expert weights and unquantized experts (default: the checkpoint's, else float32).
    slots_per_layer: device slots per MoE layer (None: all experts fit). policy: eviction
    policy ("lru"). pin_memory: pin the host store when the device is CUDA.

    >>> llm = load("path/to/Mixtral-8x7B-Instruct-v0.1", device="cuda", slots_per_layer=4)  # doctest: +SKIP
    """
    from transformers import AutoTokenizer, GenerationConfig

    from .checkpoint import Checkpoint

    path = Path(path).expanduser()
    resolved_device = resolve_device(device)
    ckpt_config = Checkpoint(path).load_config()
    default_dtype = getattr(ckpt_config, "dtype", None)
    if not isinstance(default_dtype, torch.dtype):
        default_dtype = resolve_dtype(default_dtype, torch.float32) if default_dtype else torch.float32
    cfg = OffloadConfig(
        device=resolved_device,
        dtype=resolve_dtype(dtype, default_dtype),
        slots_per_layer=slots_per_layer,
        policy=policy,
        pin_memory=pin_memory,
    )
    model, runtime = load_offloaded(path, cfg, progress=progress)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    tokenizer = None
    if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return OffloadedModel(model, tokenizer, runtime, cfg, path)
