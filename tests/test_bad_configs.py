"""config.json, tokenizer, chat-template and generation files, remote code and token ids: each bad
value is one error of offload_moe's own types naming the file, key and value, before any weight
is read (the checks of offload_moe.checkpoint.config_check, run by Checkpoint.load_config)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import offload_moe
from offload_moe.checkpoint import expert_sources, reader
from offload_moe.checkpoint.config_check import check_built_config, check_raw_config, check_tokenizer_class
from offload_moe.checkpoint.published import PUBLISHED, published_config
from offload_moe.checkpoint.reader import Checkpoint
from offload_moe.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from offload_moe.testing import TINY_DEFAULTS, make_tiny_checkpoint, tiny_config


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory):
    """Valid tiny checkpoints, written once; each test edits its own copy."""
    root = tmp_path_factory.mktemp("bad_configs")
    return {arch: make_tiny_checkpoint(root / arch, arch=arch) for arch in ("mixtral", "deepseek_v3", "dbrx")}


@pytest.fixture
def ckpt(template_dirs, tmp_path):
    return shutil.copytree(template_dirs["mixtral"], tmp_path / "mixtral")


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Fail the test if the error were only found after reading weights."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"a weight was read before validation finished: {args[1:2]}")

    monkeypatch.setattr(Checkpoint, "read", forbidden)
    monkeypatch.setattr(Checkpoint, "read_block", forbidden)
    monkeypatch.setattr(reader, "read_tensor", forbidden)
    monkeypatch.setattr(expert_sources, "read_tensor", forbidden)  # converted experts read it directly


def edit_json(path, name, **changes):
    """Set (or, with value ..., delete) keys of a JSON file; dotted keys reach into sub-objects."""
    file = path / name
    data = json.loads(file.read_text()) if file.is_file() else {}
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = data
        for parent in parents:
            node = node.setdefault(parent, {})
        if value is ...:
            node.pop(key, None)
        else:
            node[key] = value
    file.write_text(json.dumps(data))


def refused(path, error=CheckpointError, *names):
    """Load `path`; the error must be `error` and its message name every one of `names`."""
    with pytest.raises(error) as info:
        offload_moe.load(path, device="cpu", progress=False)
    message = str(info.value)
    for name in names:
        assert str(name) in message, f"{name!r} not in {message!r}"
    assert "trust_remote_code" not in message and "http" not in message
    return message


# ---------------------------------------------------------------------------------------------
# config.json values


@pytest.mark.parametrize("key, value", [
    ("num_experts_per_tok", 0), ("num_experts_per_tok", -1), ("num_experts_per_tok", 9),
    ("num_hidden_layers", 0), ("num_hidden_layers", -1), ("vocab_size", 10**12), ("vocab_size", 0),
    ("hidden_size", -64), ("intermediate_size", 2**30), ("num_local_experts", 0), ("num_key_value_heads", 0),
    ("num_attention_heads", 0), ("head_dim", 0), ("max_position_embeddings", -1), ("num_hidden_layers", 10**6),
])
def test_bad_integer(ckpt, no_weight_reads, key, value):
    edit_json(ckpt, "config.json", **{key: value})
    refused(ckpt, CheckpointError, "config.json", f"{key}={value}")


@pytest.mark.parametrize("value", ["64", 64.0, True, [64], {"a": 1}])
def test_not_an_integer(ckpt, no_weight_reads, value):
    edit_json(ckpt, "config.json", hidden_size=value)
    refused(ckpt, CheckpointError, "config.json", f"hidden_size={value!r}", "must be an integer")


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_hidden_layers", "num_experts_per_tok"])
def test_null_size(ckpt, no_weight_reads, key):
    edit_json(ckpt, "config.json", **{key: None})
    refused(ckpt, CheckpointError, "config.json", f"{key}=None")


def test_top_k_above_the_expert_count_names_both(ckpt, no_weight_reads):
    edit_json(ckpt, "config.json", num_local_experts=4, num_experts_per_tok=6)
    refused(ckpt, CheckpointError, "config.json", "num_experts_per_tok=6", "num_local_experts=4")


def test_heads_not_a_multiple_of_kv_heads(ckpt, no_weight_reads):
    edit_json(ckpt, "config.json", num_key_value_heads=3)
    refused(ckpt, CheckpointError, "config.json", "num_attention_heads=4", "num_key_value_heads=3")


def test_absurd_non_expert_size(ckpt, no_weight_reads):
    """Every dimension within bounds, but an embedding of 2**23 x 2**20: terabytes."""
    edit_json(ckpt, "config.json", vocab_size=2**23, hidden_size=2**20)
    refused(ckpt, CheckpointError, "config.json", f"vocab_size={2**23}", f"hidden_size={2**20}", "TiB")


def test_pad_token_outside_the_vocabulary(ckpt, no_weight_reads):
    edit_json(ckpt, "config.json", pad_token_id=5000)
    refused(ckpt, CheckpointError, "config.json", "pad_token_id=5000", "vocab_size=320")


@pytest.mark.parametrize("changes, names", [
    ({"n_group": 3}, ["n_routed_experts=8", "n_group=3"]),
    ({"topk_group": 3}, ["topk_group=3", "n_group=2"]),
    ({"n_group": 0}, ["n_group=0"]),
    ({"num_experts_per_tok": 6}, ["num_experts_per_tok=6", "topk_group=1"]),  # only 4 experts in 1 of 2 groups
])
def test_deepseek_groups(template_dirs, tmp_path, no_weight_reads, changes, names):
    path = shutil.copytree(template_dirs["deepseek_v3"], tmp_path / "ds")
    edit_json(path, "config.json", **changes)
    refused(path, CheckpointError, "config.json", *names)


@pytest.mark.parametrize("value", [0, 9, -2, "2"])
def test_dbrx_nested_top_k(template_dirs, tmp_path, no_weight_reads, value):
    path = shutil.copytree(template_dirs["dbrx"], tmp_path / "dbrx")
    edit_json(path, "config.json", ffn_config__moe_top_k=value)
    refused(path, CheckpointError, "config.json", "moe_top_k", repr(value) if isinstance(value, str) else str(value))


def test_nested_sub_config_named_by_path(ckpt, no_weight_reads):
    edit_json(ckpt, "config.json", text_config={"num_key_value_heads": -1})
    refused(ckpt, CheckpointError, "config.json", "text_config.num_key_value_heads=-1")


@pytest.mark.parametrize("changes, names", [
    ({"rope_scaling": "yes"}, ["rope_scaling='yes'"]),
    ({"rope_scaling": [1, 2]}, ["rope_scaling=[1, 2]"]),
    ({"rope_scaling": {"rope_type": "linear", "factor": "big"}}, ["rope_scaling.factor='big'"]),
    ({"rope_scaling": {"rope_type": 3, "factor": 2.0}}, ["rope_scaling.rope_type=3"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, ["rope_parameters.rope_theta=-1.0"]),
    ({"rope_theta": "1e6"}, ["rope_theta='1e6'"]),
    ({"rms_norm_eps": 0}, ["rms_norm_eps=0"]),
    ({"dtype": "int3"}, ["dtype='int3'"]),
])
def test_junk_numbers_and_rope(ckpt, no_weight_reads, changes, names):
    edit_json(ckpt, "config.json", **changes)
    refused(ckpt, CheckpointError, "config.json", *names)


@pytest.mark.parametrize("text, why", [
    ("", "is empty"), ("   \n", "is empty"), ('{"model_type": "mixtral",', "not valid JSON"),
    ("[1, 2]", "JSON array"), ('"mixtral"', "JSON string"), ("null", "JSON null"), ("[" * 100000, "nested too deeply"),
])
def test_config_not_a_json_object(ckpt, no_weight_reads, text, why):
    (ckpt / "config.json").write_text(text)
    refused(ckpt, CheckpointError, "config.json", why)


def test_config_not_utf8(ckpt, no_weight_reads):
    (ckpt / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    refused(ckpt, CheckpointError, "config.json", "not UTF-8")


@pytest.mark.parametrize("value, names", [(..., ["no model_type"]), (7, ["model_type=7"]), ("", ["model_type=''"]),
                                          (None, ["model_type=None"])])
def test_model_type_missing_or_not_a_string(ckpt, no_weight_reads, value, names):
    edit_json(ckpt, "config.json", model_type=value)
    refused(ckpt, CheckpointError, "config.json", *names)


def test_unknown_model_type_is_ours_not_transformers(ckpt, no_weight_reads):
    edit_json(ckpt, "config.json", model_type="my_new_moe")
    refused(ckpt, UnsupportedArchitectureError, "config.json", "'my_new_moe'", "not supported")


def _evil_code(path, marker):
    """A configuration module that, if anything ever imported it, would leave `marker` behind."""
    (path / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}


def test_remote_code_is_refused_in_one_line(ckpt, tmp_path, no_weight_reads):
    marker = tmp_path / "ran"
    edit_json(ckpt, "config.json", model_type="evil_moe", auto_map=_evil_code(ckpt, marker))
    message = refused(ckpt, UnsupportedArchitectureError, "config.json", "'evil_moe'", "never runs checkpoint code")
    assert "\n" not in message
    assert not marker.exists()


def test_auto_map_of_a_family_transformers_implements_runs_no_checkpoint_code(ckpt, tmp_path):
    """Published DeepSeek and Phi-3.5-MoE checkpoints carry auto_map next to a model type
    transformers implements: its own implementation is used, the shipped code never runs."""
    marker = tmp_path / "ran"
    edit_json(ckpt, "config.json", auto_map=_evil_code(ckpt, marker))
    config = Checkpoint(ckpt).load_config()
    assert type(config).__name__ == "MixtralConfig"
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Tokenizer, chat template and generation files


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                  "special_tokens_map.json"])
@pytest.mark.parametrize("text, why", [("", "is empty"), ('{"version": ', "not valid JSON"), ("[]", "JSON array")])
def test_corrupt_side_file(ckpt, no_weight_reads, name, text, why):
    (ckpt / name).write_text(text)
    refused(ckpt, CheckpointError, name, why)


def test_unknown_tokenizer_class(ckpt, no_weight_reads):
    edit_json(ckpt, "tokenizer_config.json", tokenizer_class="NoSuchTokenizerAnywhere")
    refused(ckpt, CheckpointError, "tokenizer_config.json", "tokenizer_class='NoSuchTokenizerAnywhere'")


def test_remote_tokenizer_is_refused(ckpt, no_weight_reads):
    edit_json(ckpt, "tokenizer_config.json", tokenizer_class="EvilTokenizer",
              auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    refused(ckpt, CheckpointError, "tokenizer_config.json", "tokenizer_class='EvilTokenizer'", "never runs checkpoint code")


@pytest.mark.parametrize("name", ["TokenizersBackend", "PreTrainedTokenizerFast", "LlamaTokenizerFast",
                                  "LlamaTokenizer", "GPT2TokenizerFast", "Qwen2Tokenizer"])
def test_known_tokenizer_classes_pass(tmp_path, name):
    check_tokenizer_class(tmp_path / "tokenizer_config.json", name)


@pytest.mark.parametrize("name", ["AutoModel", "LlamaForCausalLM", "", 5])
def test_non_tokenizer_classes_are_refused(tmp_path, name):
    with pytest.raises(CheckpointError, match="tokenizer_class="):
        check_tokenizer_class(tmp_path / "tokenizer_config.json", name)


@pytest.mark.parametrize("changes, names", [
    ({"max_new_tokens": -1}, ["max_new_tokens=-1"]),
    ({"max_new_tokens": 0}, ["max_new_tokens=0"]),
    ({"temperature": "hot"}, ["temperature='hot'"]),
    ({"temperature": -0.5}, ["temperature=-0.5"]),
    ({"top_p": 1.5}, ["top_p=1.5"]),
    ({"num_beams": 0}, ["num_beams=0"]),
    ({"do_sample": "yes"}, ["do_sample='yes'"]),
    ({"eos_token_id": 5000}, ["eos_token_id=5000"]),
    ({"eos_token_id": [2, -3]}, ["eos_token_id=-3"]),
    ({"pad_token_id": "0"}, ["pad_token_id='0'"]),
])
def test_bad_generation_config(ckpt, no_weight_reads, changes, names):
    edit_json(ckpt, "generation_config.json", **changes)
    refused(ckpt, CheckpointError, "generation_config.json", *names)


BROKEN_TEMPLATE = "{% for message in messages %}{{ message['content'] }"


def test_broken_chat_template_in_tokenizer_config(ckpt, no_weight_reads):
    edit_json(ckpt, "tokenizer_config.json", chat_template=BROKEN_TEMPLATE)
    (ckpt / "chat_template.jinja").unlink(missing_ok=True)
    refused(ckpt, CheckpointError, "tokenizer_config.json", "chat template does not compile")


def test_broken_chat_template_file(ckpt, no_weight_reads):
    (ckpt / "chat_template.jinja").write_text(BROKEN_TEMPLATE)
    refused(ckpt, CheckpointError, "chat_template.jinja", "chat template does not compile")


@pytest.mark.parametrize("value", [5, [{"name": "default", "template": 5}]])
def test_chat_template_not_a_string(ckpt, no_weight_reads, value):
    (ckpt / "chat_template.jinja").unlink(missing_ok=True)
    edit_json(ckpt, "tokenizer_config.json", chat_template=value)
    refused(ckpt, CheckpointError, "tokenizer_config.json", "chat_template=5")


def test_generation_tag_and_named_templates_compile(ckpt):
    (ckpt / "chat_template.jinja").unlink(missing_ok=True)
    edit_json(ckpt, "tokenizer_config.json", chat_template=[
        {"name": "default", "template": "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}"
                                        "{% endfor %}"},
        {"name": "tool_use", "template": "{{ messages | length }}"}])
    Checkpoint(ckpt).load_config()


# ---------------------------------------------------------------------------------------------
# At first use: templates that compile but fail to render, token ids


@pytest.fixture(scope="module")
def llm(template_dirs):
    with offload_moe.load(template_dirs["mixtral"], device="cpu", progress=False) as model:
        yield model


@pytest.fixture
def session_with_template(llm):
    original = llm.tokenizer.chat_template

    def make(template):
        llm.tokenizer.chat_template = template
        return llm.chat_session()

    yield make
    llm.tokenizer.chat_template = original


@pytest.mark.parametrize("template, error, names", [
    ("{{ messages[0]['content'] + 1 }}", CheckpointError, ["fails to render", "TypeError"]),
    ("{{ raise_exception('only one user turn, please') }}", ConfigError, ["refuses this conversation",
                                                                          "only one user turn, please"]),
    # The sandbox holds: no path from a template to Python internals.
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", CheckpointError, ["fails to render"]),
    ("{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}", CheckpointError, ["fails to render"]),
])
def test_template_failing_at_render(session_with_template, template, error, names):
    chat = session_with_template(template)
    with pytest.raises(error) as info:
        chat.send("hello", max_new_tokens=1)
    for name in ["chat_template.jinja" if (chat.llm.path / "chat_template.jinja").is_file() else "tokenizer_config.json",
                 *names]:
        assert name in str(info.value)
    assert "pwned" not in str(info.value)
    assert chat.messages == []  # the refused turn is not kept


def test_chat_without_a_template(session_with_template):
    chat = session_with_template(None)
    with pytest.raises(ConfigError, match="has no chat template"):
        chat.send("hello", max_new_tokens=1)
    assert chat.messages == []


@pytest.mark.parametrize("prompt, names", [
    ([1, 320], ["token id 320", "320 tokens"]),
    ([1, -1], ["token id -1", "320 tokens"]),
    ([[1, 2], [3, 10**6]], ["token id 1000000", "row 1, position 1"]),
    (torch.tensor([[5, 400]]), ["token id 400"]),
    ([1.5, 2.0], ["must be integers", "float"]),
    ([], ["at least one token"]),
    ([[1, 2], [3]], ["neither text nor token ids"]),
    ([2**70], ["neither text nor token ids"]),
])
def test_bad_token_ids(llm, prompt, names):
    with pytest.raises(ConfigError) as info:
        llm.generate(prompt, max_new_tokens=1)
    for name in names:
        assert name in str(info.value)


def test_good_token_ids_still_generate(llm):
    out = llm.generate([1, 5, 319], max_new_tokens=2)
    assert out.dtype == torch.long and out.shape[1] >= 4 and out[0, :3].tolist() == [1, 5, 319]


# ---------------------------------------------------------------------------------------------
# Nothing real is refused


def test_published_and_tiny_configs_pass():
    for name, settings in PUBLISHED.items():
        check_raw_config(dict(settings), Path(name) / "config.json")
        check_built_config(published_config(name), Path(name) / "config.json")
    for arch in TINY_DEFAULTS:
        config = tiny_config(arch)
        check_raw_config(config.to_dict(), Path(arch) / "config.json")
        check_built_config(config, Path(arch) / "config.json")


def test_every_causal_lm_family_default_config_passes():
    """The family walk of tests/test_architectures.py loads every MoE family's tiny config: none
    may be refused by these checks (only by describe_model's refusal of its architecture)."""
    from test_architectures import _tiny_any
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from offload_moe.model.arch import _is_experts_module

    failures, checked = [], 0
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        configs = []
        try:  # the family's default config, as published configs start from it
            configs.append(AutoConfig.for_model(model_type))
        except Exception:  # noqa: BLE001 - transformers cannot build this family's default itself
            pass
        built = _tiny_any(model_type)
        if built is not None and any(_is_experts_module(m) for m in built[1].modules()):
            configs.append(built[0])  # the shrunk config the walk loads
        for config in configs if model_type not in TINY_DEFAULTS else [tiny_config(model_type)]:
            checked += 1
            try:
                check_raw_config(json.loads(config.to_json_string()), Path(model_type) / "config.json")
                check_built_config(config, Path(model_type) / "config.json")
            except (CheckpointError, UnsupportedArchitectureError) as exc:
                failures.append(str(exc))
    # transformers' own defaults of two dense (non-MoE, so never loaded) families name an eos id
    # of another vocabulary; published checkpoints of them set both consistently.
    known = {"arcee/config.json: eos_token_id=128001 is outside the vocabulary (vocab_size=32000)",
             "starcoder2/config.json: eos_token_id=50256 is outside the vocabulary (vocab_size=49152)"}
    assert checked > 100 and not set(failures) - known, "\n".join(failures)
