"""A validated config.json, and the tokenizer and generation files next to it.

Everything here reads metadata only, so a bad value is refused in one error that names the
file, the key and the value before any weight is read, instead of surfacing later as an
allocation of terabytes, an IndexError in generate() or a transformers traceback.

The checks are tables: `INT_RULES` bounds every integer size, count and top-k a family may
name (wherever it sits in config.json, nested sub-configs included); `GENERATION_INT_RULES`
and `GENERATION_FLOAT_RULES` do the same for generation_config.json. Relations between keys
(top-k within the expert count, heads divisible by KV heads, DeepSeek's expert groups, the
non-expert size) are checked on the config transformers builds, where every default is filled.

Checkpoint code is never run: configs are built with trust_remote_code=False, and a config
whose model type transformers does not implement is refused even if it ships code for one;
the exceptions are DeepSeekMoE-16B and LLaMA-MoE v1, recognised by model_type and their
published class names (model/remote_families.py) and built by offload_moe's own config classes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from offload_moe.errors import CheckpointError, UnsupportedArchitectureError
from offload_moe.model.remote_families import check_remote_settings, recognise_remote_family, remote_config_class

_DIM = 2**24  # no real model has a width, vocabulary or rank near this
_COUNT = 2**16  # heads, experts, groups
_LAYERS = 2**12
_POSITIONS = 2**32  # positions cost no memory up front; only absurd values are refused

# key -> (lowest, highest) allowed; null is left to the family's default (checked afterwards).
INT_RULES: dict[str, tuple[int, int]] = {
    "hidden_size": (1, _DIM), "d_model": (1, _DIM), "intermediate_size": (1, _DIM),
    "moe_intermediate_size": (1, _DIM), "ffn_hidden_size": (1, _DIM), "shared_expert_intermediate_size": (0, _DIM),
    "vocab_size": (1, _DIM), "kv_lora_rank": (1, _DIM), "q_lora_rank": (1, _DIM),
    "num_attention_heads": (1, _COUNT), "n_heads": (1, _COUNT), "num_key_value_heads": (1, _COUNT),
    "kv_n_heads": (1, _COUNT), "head_dim": (1, _COUNT), "qk_rope_head_dim": (1, _COUNT),
    "qk_nope_head_dim": (0, _COUNT), "v_head_dim": (1, _COUNT),
    "num_hidden_layers": (1, _LAYERS), "n_layers": (1, _LAYERS), "first_k_dense_replace": (0, _LAYERS),
    "decoder_sparse_step": (1, _LAYERS),
    "num_local_experts": (1, _COUNT), "num_experts": (1, _COUNT), "n_routed_experts": (1, _COUNT),
    "moe_num_experts": (1, _COUNT), "n_shared_experts": (0, _COUNT),
    "num_experts_per_tok": (1, _COUNT), "moe_top_k": (1, _COUNT), "top_k": (1, _COUNT),
    "num_selected_experts": (1, _COUNT), "n_group": (1, _COUNT), "topk_group": (1, _COUNT),
    "max_position_embeddings": (1, _POSITIONS), "max_seq_len": (1, _POSITIONS),
    "num_selects": (1, _COUNT), "moe_layer_freq": (1, _LAYERS),  # LLaMA-MoE's top-k, DeepSeekMoE's MoE period
    # Encoder-decoder families (Switch Transformers / T5 names, NLLB-MoE's).
    "d_ff": (1, _DIM), "d_kv": (1, _COUNT), "num_decoder_layers": (1, _LAYERS), "expert_capacity": (1, _POSITIONS),
    "encoder_ffn_dim": (1, _DIM), "decoder_ffn_dim": (1, _DIM),
}
# key -> exclusive lower bound of a finite number.
FLOAT_RULES: dict[str, float] = {"rope_theta": 0.0, "rms_norm_eps": 0.0, "layer_norm_eps": 0.0,
                                 "routed_scaling_factor": 0.0}
ROPE_KEYS = ("rope_scaling", "rope_parameters")
# Sizes a family may leave null for its config class to derive (or that some family leaves unset).
NULLABLE_INT_KEYS = frozenset({
    "head_dim", "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "n_shared_experts",
    "shared_expert_intermediate_size", "moe_intermediate_size", "n_group", "topk_group", "first_k_dense_replace",
    "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok", "moe_top_k",
    "top_k", "num_selected_experts", "decoder_sparse_step", "intermediate_size", "qk_rope_head_dim",
    "qk_nope_head_dim", "v_head_dim", "max_position_embeddings", "max_seq_len",
    "num_decoder_layers",  # T5/Switch: null means as many as the encoder
})

# Sizes some families give per layer, as a list.
PER_LAYER_INT_KEYS = frozenset({"intermediate_size", "num_attention_heads", "num_key_value_heads"})

# The names families give the top-k and the expert count, in the order arch._top_k reads them.
TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# Non-expert weights above this many bytes (at 16 bits) are a broken config, not a model.
MAX_NON_EXPERT_BYTES = 2**40

GENERATION_INT_RULES: dict[str, tuple[int, int]] = {
    "max_new_tokens": (1, _POSITIONS), "max_length": (1, _POSITIONS), "min_length": (0, _POSITIONS),
    "min_new_tokens": (0, _POSITIONS), "num_beams": (1, _COUNT), "num_beam_groups": (1, _COUNT),
    "num_return_sequences": (1, _COUNT), "top_k": (0, _DIM), "no_repeat_ngram_size": (0, _POSITIONS),
}
# key -> (lowest, highest) of a finite number, both inclusive.
GENERATION_FLOAT_RULES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, math.inf), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0), "typical_p": (0.0, 1.0),
    "repetition_penalty": (0.0, math.inf), "length_penalty": (-math.inf, math.inf),
}
GENERATION_BOOL_KEYS = ("do_sample", "use_cache", "early_stopping")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")

# Files next to config.json that transformers parses as JSON objects.
JSON_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json", "chat_template.json")


# ---------------------------------------------------------------------------------------------
# Reading


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file that must hold an object, or a CheckpointError naming the file and why not."""
    try:
        raw = file.read_bytes()
        if not raw.strip():
            raise CheckpointError(f"{file}: is empty (expected a JSON object)")
        data = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{file}: is not UTF-8 text (expected a JSON object)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{file}: is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise CheckpointError(f"{file}: is nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: must hold a JSON object, not a JSON {json_type(data)}")
    return data


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def load_validated_config(path: Path):
    """The transformers config of the checkpoint directory `path`, every value checked; the
    tokenizer, chat-template and generation files beside it are checked too (metadata only)."""
    config_path = path / "config.json"
    raw = read_json_object(config_path)
    check_raw_config(raw, config_path)
    config = _build_config(path, raw, config_path)
    check_built_config(config, config_path)
    check_side_files(path, _attr(text_config(config), "vocab_size"))
    return config


def _build_config(path: Path, raw: dict[str, Any], config_path: Path):
    """AutoConfig without remote code; whatever transformers raises becomes our one-line error
    (its own suggests trust_remote_code, which offload_moe never uses)."""
    from transformers import AutoConfig

    try:
        if recognise_remote_family(raw) is not None:  # offload_moe's own config class; no code of the checkpoint's
            return remote_config_class(raw["model_type"]).from_pretrained(path, local_files_only=True)
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - config classes raise anything: ValueError, TypeError, ...
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        field = re.search(r"field '(\w+)'", str(exc))  # transformers' strict dataclass validation names it
        culprit = f"{field[1]}={raw.get(field[1])!r}: " if field and field[1] in raw else ""
        raise CheckpointError(
            f"{config_path}: {culprit}transformers cannot build a {raw['model_type']!r} config from it "
            f"({type(exc).__name__}: {'; '.join(lines[:3])[:300]})"
        ) from None


# ---------------------------------------------------------------------------------------------
# config.json as written


def check_raw_config(raw: dict[str, Any], config_path: Path) -> None:
    """model_type, remote code, and every integer, number and rope entry, before transformers
    sees the file (its config classes divide by, allocate from or silently keep bad values)."""
    _check_model_type(raw, config_path)
    _check_values(raw, config_path, prefix="")


def _check_model_type(raw: dict[str, Any], config_path: Path) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "model_type" not in raw:
        raise CheckpointError(f"{config_path}: has no model_type key (the model family, e.g. 'mixtral')")
    model_type = raw["model_type"]
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(
            f"{config_path}: model_type={model_type!r} must be a non-empty string naming the model family")
    if model_type in CONFIG_MAPPING:
        return  # transformers' own implementation is used; any auto_map code is never run
    if recognise_remote_family(raw) is not None:  # run by offload_moe's own modules; auto_map only names it
        check_remote_settings(raw, config_path)
        return
    if raw.get("auto_map"):
        raise UnsupportedArchitectureError(
            f"{config_path}: model_type {model_type!r} is implemented only by code shipped with the checkpoint "
            f"(auto_map); offload_moe never runs checkpoint code"
        )
    raise UnsupportedArchitectureError(
        f"{config_path}: model_type {model_type!r} is not supported: the installed transformers has no such model type"
    )


def _check_values(node: dict[str, Any], config_path: Path, prefix: str) -> None:
    """The tables' rules on `node` and on every sub-config dict below it (text_config,
    ffn_config, attn_config, ...), keys named by their dotted path."""
    for key, value in node.items():
        name = f"{prefix}{key}"
        if key in ROPE_KEYS:
            _check_rope(value, config_path, name)
        elif value is None:
            if key in INT_RULES and key not in NULLABLE_INT_KEYS:
                raise CheckpointError(f"{config_path}: {name}=None must be an integer ({_range(*INT_RULES[key])})")
        elif key in PER_LAYER_INT_KEYS and isinstance(value, list):  # per-layer sizes (Gemma-3n, OpenELM)
            for i, item in enumerate(value):
                check_int(config_path, f"{name}[{i}]", item, *INT_RULES[key])
        elif key in INT_RULES:
            check_int(config_path, name, value, *INT_RULES[key])
        elif key in FLOAT_RULES:
            check_number(config_path, name, value, FLOAT_RULES[key], math.inf, low_inclusive=False)
        elif key in ("dtype", "torch_dtype"):
            _check_dtype_name(config_path, name, value)
        elif isinstance(value, dict):
            _check_values(value, config_path, prefix=f"{name}.")


def _range(low: int, high: int) -> str:
    return f"between {low} and {high}"


def check_int(file: Path, key: str, value: Any, low: int, high: int) -> int:
    """`value` as an integer in [low, high], or a CheckpointError naming file, key and value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{file}: {key}={value!r} must be an integer ({_range(low, high)})")
    if not low <= value <= high:
        raise CheckpointError(f"{file}: {key}={value} is out of range (allowed: {low} to {high})")
    return value


def check_number(file: Path, key: str, value: Any, low: float, high: float, low_inclusive: bool = True) -> float:
    """`value` as a finite number in [low, high] (low excluded unless low_inclusive)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{file}: {key}={value!r} must be a finite number")
    if value > high or value < low or (value == low and not low_inclusive):
        bound = f"{'at least' if low_inclusive else 'above'} {low}"
        bound += f" and at most {high}" if high != math.inf else ""
        raise CheckpointError(f"{file}: {key}={value!r} is out of range (must be {bound})")
    return value


def _check_rope(value: Any, config_path: Path, name: str) -> None:
    """rope_scaling / rope_parameters: null, or a dict (per layer type: a dict of dicts) whose
    factor and theta are positive numbers and whose type is a string."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise CheckpointError(f"{config_path}: {name}={value!r} must be a JSON object or null")
    for key, item in value.items():
        if isinstance(item, dict):
            _check_rope(item, config_path, f"{name}.{key}")
        elif key in ("rope_type", "type") and not isinstance(item, str):
            raise CheckpointError(f"{config_path}: {name}.{key}={item!r} must be a string")
        elif key in ("factor", "rope_theta") and item is not None:
            check_number(config_path, f"{name}.{key}", item, 0.0, math.inf, low_inclusive=False)


def _check_dtype_name(config_path: Path, name: str, value: Any) -> None:
    import torch

    dtype = getattr(torch, value, None) if isinstance(value, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{config_path}: {name}={value!r} is not a floating-point dtype (e.g. 'bfloat16')")


# ---------------------------------------------------------------------------------------------
# The config transformers built (defaults filled in)


_MISSING = object()


def text_config(config):
    """The config of the language model inside `config` (itself for a text-only family); a
    family with several text configs (an encoder and a decoder) is checked at its top level."""
    try:
        return config.get_text_config()
    except ValueError:
        return config


def _attr(obj: Any, key: str, default: Any = None) -> Any:
    """getattr(obj, key, default), also where a config refuses to answer (heterogeneous configs
    raise for a per-layer key read globally): such a value is not checked globally."""
    try:
        return getattr(obj, key, default)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError and the like
        return None


def _first_int(config, keys: tuple[str, ...]) -> tuple[str, int] | None:
    for key in keys:
        value = _attr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    ffn = _attr(config, "ffn_config", None)  # DBRX keeps its experts' settings there
    for key in keys:
        value = _attr(ffn, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return f"ffn_config.{key}", value
    return None


def check_built_config(config, config_path: Path) -> None:
    """Relations between keys, on the (text) config with every default in place."""
    text = text_config(config)
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        value = _attr(text, key, _MISSING)
        if value is not _MISSING:
            check_int(config_path, key, value, *INT_RULES[key])
    _check_top_k(text, config_path)
    _check_heads(text, config_path)
    _check_groups(text, config_path)
    _check_pad_token(text, config_path)
    _check_non_expert_size(text, config_path)


def _check_top_k(text, config_path: Path) -> None:
    top_k, experts = _first_int(text, TOP_K_KEYS), _first_int(text, EXPERT_COUNT_KEYS)
    if experts is None:
        return
    if top_k is None:  # a null top-k would silently route to a default number of experts
        for key in TOP_K_KEYS:
            if key in vars(text) and vars(text)[key] is None:
                raise CheckpointError(f"{config_path}: {key}=None must be an integer (between 1 and {experts[1]})")
        return
    (k_key, k), (e_key, e) = top_k, experts
    if not 1 <= k <= e:
        raise CheckpointError(
            f"{config_path}: {k_key}={k} must be between 1 and the number of experts ({e_key}={e})")


def _check_heads(text, config_path: Path) -> None:
    heads = _attr(text, "num_attention_heads", None)
    kv_key, kv = "num_key_value_heads", _attr(text, "num_key_value_heads", None)
    attn = _attr(text, "attn_config", None)  # DBRX
    if kv is None and _attr(attn, "kv_n_heads", None) is not None:
        kv_key, kv = "attn_config.kv_n_heads", attn.kv_n_heads
    if isinstance(heads, int) and isinstance(kv, int):
        check_int(config_path, kv_key, kv, *INT_RULES["num_key_value_heads"])
        if heads % kv:
            raise CheckpointError(
                f"{config_path}: num_attention_heads={heads} is not a multiple of {kv_key}={kv} "
                "(each KV head serves a whole group of query heads)")
    hidden, head_dim = _attr(text, "hidden_size", None), _attr(text, "head_dim", None)
    if isinstance(heads, int) and isinstance(hidden, int) and head_dim is None and hidden < heads:
        raise CheckpointError(
            f"{config_path}: hidden_size={hidden} is smaller than num_attention_heads={heads} "
            "(with no head_dim, each head is hidden_size / num_attention_heads wide)")


def _check_groups(text, config_path: Path) -> None:
    """DeepSeek's grouped routing: experts split into n_group groups, top-k from topk_group of them."""
    experts, groups, chosen = (_attr(text, k, None) for k in ("n_routed_experts", "n_group", "topk_group"))
    if not all(isinstance(v, int) for v in (experts, groups, chosen)):
        return
    if experts % groups:
        raise CheckpointError(f"{config_path}: n_routed_experts={experts} is not a multiple of n_group={groups}")
    if chosen > groups:
        raise CheckpointError(f"{config_path}: topk_group={chosen} is more than n_group={groups}")
    top_k = _attr(text, "num_experts_per_tok", None)
    grouped = _attr(text, "topk_method", "group_limited_greedy") != "greedy"
    if grouped and isinstance(top_k, int) and top_k > chosen * (experts // groups):
        raise CheckpointError(
            f"{config_path}: num_experts_per_tok={top_k} is more than the {chosen * (experts // groups)} experts "
            f"of topk_group={chosen} groups of n_routed_experts/n_group={experts // groups}")


def _check_pad_token(text, config_path: Path) -> None:
    """The ids generation uses (pad, and eos: a list too) inside the vocabulary: it would pad with
    an id the embedding does not have, or never stop. Negative ids are left alone (some configs
    use -1 for "none"); bos is not checked: transformers' own default configs of several families
    carry a bos outside their vocabulary, and generation from a prompt never uses it."""
    vocab = _attr(text, "vocab_size", None)
    if not isinstance(vocab, int):
        return
    for key in ("eos_token_id", "pad_token_id"):
        value = _attr(text, key, None)
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and not isinstance(token, bool) and not -vocab <= token < vocab:
                raise CheckpointError(f"{config_path}: {key}={value} is outside the vocabulary (vocab_size={vocab})")


def _check_non_expert_size(text, config_path: Path) -> None:
    """Refuse a config whose embeddings, attention and dense MLPs alone could not be held: an
    upper bound (every layer dense, full attention) from the sizes present."""
    size = {k: _attr(text, k, None) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                 "num_attention_heads", "intermediate_size", "head_dim")}
    vocab, hidden, layers = size["vocab_size"], size["hidden_size"], size["num_hidden_layers"]
    if not all(isinstance(v, int) for v in (vocab, hidden, layers)):
        return
    heads = size["num_attention_heads"] if isinstance(size["num_attention_heads"], int) else 1
    head_dim = size["head_dim"] if isinstance(size["head_dim"], int) else max(hidden // heads, 1)
    ffn = size["intermediate_size"] if isinstance(size["intermediate_size"], int) else 0
    params = 2 * vocab * hidden + layers * (4 * hidden * heads * head_dim + 3 * hidden * ffn)
    if 2 * params > MAX_NON_EXPERT_BYTES:
        raise CheckpointError(
            f"{config_path}: vocab_size={vocab}, hidden_size={hidden}, num_hidden_layers={layers}, "
            f"intermediate_size={ffn} give about {2 * params / 2**40:.0f} TiB of non-expert weights; "
            "the config is broken")


# ---------------------------------------------------------------------------------------------
# Tokenizer, chat template and generation files


def check_side_files(path: Path, vocab_size: int | None) -> None:
    """Every tokenizer, chat-template and generation file present is valid, before transformers
    reads it (its errors name no file) and before any weight is read."""
    for name in (*JSON_SIDE_FILES, "tokenizer.model", "chat_template.jinja"):
        file = path / name
        if (file.exists() or file.is_symlink()) and not file.is_file():  # a FIFO would hang transformers' open()
            raise CheckpointError(f"{file}: is not a regular file (a directory, FIFO, device or broken symlink)")
    side = {name: read_json_object(path / name) for name in JSON_SIDE_FILES if (path / name).is_file()}
    if "tokenizer_config.json" in side:
        tokenizer_config = side["tokenizer_config.json"]
        check_tokenizer_class(path / "tokenizer_config.json", tokenizer_config.get("tokenizer_class"),
                              remote=bool(tokenizer_config.get("auto_map")))
    for file, template in chat_templates(path, side):
        compile_chat_template(file, template)
    if "generation_config.json" in side:
        check_generation_config(path / "generation_config.json", side["generation_config.json"], vocab_size)


def check_tokenizer_class(file: Path, name: Any, remote: bool = False) -> None:
    """tokenizer_class must be a class transformers knows (it silently falls back otherwise);
    `remote`: the file names code of its own for it (auto_map), which is never run."""
    if name is None:
        return
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if isinstance(name, str) and name:
        candidates = {name, name + "Fast", name.removesuffix("Fast")}
        if any(_is_tokenizer_class(tokenizer_class_from_name(c)) for c in candidates):
            return
    if remote:
        raise CheckpointError(f"{file}: tokenizer_class={name!r} is implemented only by code shipped with the "
                              "checkpoint (auto_map); offload_moe never runs checkpoint code")
    raise CheckpointError(f"{file}: tokenizer_class={name!r} is not a tokenizer class transformers knows")


def _is_tokenizer_class(cls: Any) -> bool:
    return isinstance(cls, type) and ("Tokenizer" in cls.__name__ or cls.__name__.endswith("Backend"))


def chat_templates(path: Path, side: dict[str, dict[str, Any]]) -> list[tuple[Path, Any]]:
    """(file, template) of every chat template the checkpoint carries: chat_template.jinja,
    additional_chat_templates/*.jinja, chat_template.json and tokenizer_config.json's."""
    found: list[tuple[Path, Any]] = []
    jinja_files = [path / "chat_template.jinja", *sorted((path / "additional_chat_templates").glob("*.jinja"))]
    for file in jinja_files:
        if file.is_file():
            try:
                found.append((file, file.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{file}: cannot be read as a chat template ({exc})") from None
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = side.get(name, {}).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            found += [(path / name, t.get("template") if isinstance(t, dict) else t) for t in template]
        elif template is not None:
            found.append((path / name, template))
    return found


def chat_template_file(path: Path) -> Path:
    """The file the tokenizer's default chat template comes from (transformers lets
    chat_template.jinja override tokenizer_config.json's chat_template)."""
    jinja = Path(path) / "chat_template.jinja"
    return jinja if jinja.is_file() else Path(path) / "tokenizer_config.json"


def compile_chat_template(file: Path, template: Any) -> None:
    """Compile (never render) a chat template in the sandboxed environment transformers renders
    it with, so a syntax error is reported at load naming its file."""
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if not isinstance(template, str):
        raise CheckpointError(f"{file}: chat_template={template!r} must be a string")
    try:
        _compile_jinja_template(template)
    except (TemplateError, RecursionError) as exc:
        line = getattr(exc, "lineno", None)
        raise CheckpointError(
            f"{file}: the chat template does not compile ({type(exc).__name__}: {exc}"
            f"{f', line {line}' if line else ''})") from None


def check_generation_config(file: Path, data: dict[str, Any], vocab_size: int | None) -> None:
    """generation_config.json's numbers, flags and token ids (ids within the vocabulary)."""
    for key, value in data.items():
        if value is None:
            continue
        if key in GENERATION_INT_RULES:
            check_int(file, key, value, *GENERATION_INT_RULES[key])
        elif key in GENERATION_FLOAT_RULES:
            check_number(file, key, value, *GENERATION_FLOAT_RULES[key])
        elif key in GENERATION_BOOL_KEYS and not isinstance(value, bool):
            raise CheckpointError(f"{file}: {key}={value!r} must be true or false")
        elif key in TOKEN_ID_KEYS:
            for token in value if isinstance(value, list) else [value]:
                check_int(file, key, token, 0, (vocab_size or _DIM) - 1)
