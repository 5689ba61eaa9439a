"""Bad options, environment variables and paths: refused before loading, in one line that names
the option as the user wrote it (CLI flag, OFFLOAD_MOE_* variable or API keyword) and the value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import offload_moe
from offload_moe import cli
from offload_moe.checkpoint.published import published_config
from offload_moe.errors import ConfigError
from offload_moe.options import OPTIONS, SEED_MAX, check_keyword
from offload_moe.testing import make_tiny_checkpoint
from offload_moe.units import parse_bytes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("OFFLOAD_MOE_"):
            monkeypatch.delenv(var)


@pytest.fixture
def no_load(monkeypatch):
    """Any load is a failure: every refusal here must come before one."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(offload_moe, "load", refuse)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("bad_options_model"), seed=3)


def one_error_line(capsys, argv, code=2):
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("flag, value, allowed", [
    ("--max-new-tokens", "0", ">= 1"),
    ("--max-new-tokens", "-1", ">= 1"),
    ("--max-new-tokens", "many", "whole number"),
    ("--top-p", "2", "(0, 1]"),
    ("--top-p", "-0.1", "(0, 1]"),
    ("--top-p", "0", "(0, 1]"),
    ("--top-k", "-1", ">= 0"),
    ("--repetition-penalty", "0", "> 0"),
    ("--repetition-penalty", "-1", "> 0"),
    ("--repetition-penalty", "nan", "> 0"),
    ("--seed", str(2**80), str(SEED_MAX)),
    ("--temperature", "nan", ">= 0"),
    ("--temperature", "-1", ">= 0"),
    ("--temperature", "inf", ">= 0"),
    ("--temperature", "warm", "number"),
    ("--context", "-1", "[1, 16777216]"),
    ("--slots", "0", ">= 1"),
    ("--prefetch", "-2", ">= 0"),
    ("--cpu-memory", "nan", "finite"),
    ("--cpu-memory", "0", "positive"),
    ("--gpu-memory", "-5GiB", "positive"),
    ("--gpu-memory", "99999TiB", "at most"),
    ("--experts", "hqq9", "hqq4"),
    ("--policy", "mru", "markov"),
    ("--device", "tpu", "cuda"),
])
def test_a_bad_flag_is_one_line_naming_flag_value_and_what_is_allowed(capsys, no_load, model, flag, value, allowed):
    line = one_error_line(capsys, ["generate", model, "--prompt", "hi", flag, value])
    assert flag in line and repr(value) in line and allowed in line


@pytest.mark.parametrize("argv", [["--gpu-memory=-5GiB"], ["--gpu-memory", "-5GiB"], ["--temperature", "-inf"]])
def test_a_negative_value_after_its_flag_is_read_as_the_value(capsys, no_load, model, argv):
    line = one_error_line(capsys, ["generate", model, "--prompt", "hi", *argv])
    assert argv[0].split("=")[0] in line and ("'-5GiB'" in line or "'-inf'" in line)


@pytest.mark.parametrize("var, value, words", [
    ("OFFLOAD_MOE_HYBRID", "maybe", "true/false"),
    ("OFFLOAD_MOE_IGNORE_EOS", "sure", "yes/no"),
    ("OFFLOAD_MOE_TOP_P", "2", "(0, 1]"),
    ("OFFLOAD_MOE_CONTEXT", "-1", "[1, "),
    ("OFFLOAD_MOE_GPU_MEMORY", "-5GiB", "positive"),
    ("OFFLOAD_MOE_SEED", "1.5", "whole number"),
    ("OFFLOAD_MOE_DTYPE", "int8", "bf16"),
])
def test_a_bad_environment_variable_is_named(capsys, monkeypatch, no_load, model, var, value, words):
    monkeypatch.setenv(var, value)
    line = one_error_line(capsys, ["generate", model, "--prompt", "hi"])
    assert f"{var}={value!r}" in line and words in line


def test_booleans_take_the_usual_words_and_a_flag_beats_its_variable(monkeypatch):
    parse = cli.build_parser().parse_args
    for word, value in (("1", True), ("off", False), ("Yes", True), ("FALSE", False)):
        monkeypatch.setenv("OFFLOAD_MOE_HYBRID", word)
        assert parse(["chat"]).hybrid is value
    assert parse(["chat", "--no-hybrid"]).hybrid is False
    monkeypatch.setenv("OFFLOAD_MOE_TOP_P", "2")
    assert parse(["generate", "--top-p", "0.5"]).top_p == 0.5  # the bad variable is never read
    monkeypatch.delenv("OFFLOAD_MOE_HYBRID")
    monkeypatch.delenv("OFFLOAD_MOE_TOP_P")
    assert parse(["chat"]).hybrid is None


def test_a_variable_is_checked_only_for_the_command_that_runs(monkeypatch, capsys):
    monkeypatch.setenv("OFFLOAD_MOE_EXPERTS", "gptq")  # fine for chat, not a format plan knows
    assert cli.build_parser().parse_args(["chat"]).experts == "gptq"
    line = one_error_line(capsys, ["plan", "Qwen/Qwen3-30B-A3B"])
    assert "OFFLOAD_MOE_EXPERTS='gptq'" in line


def test_chat_passes_only_the_sampling_the_user_set(monkeypatch):
    parse = cli.build_parser().parse_args
    assert cli.generation_kwargs(parse(["chat"])) == {"max_new_tokens": 256}
    monkeypatch.setenv("OFFLOAD_MOE_TOP_P", "0.5")
    kwargs = cli.generation_kwargs(parse(["chat", "--temperature", "0"]))
    assert kwargs == {"max_new_tokens": 256, "temperature": 0.0, "top_p": 0.5}
    greedy = cli.generation_kwargs(parse(["generate"]))
    assert greedy["do_sample"] is False and greedy["repetition_penalty"] == 1.0


def test_record_routing_folder_must_exist_and_be_writable(capsys, no_load, model, tmp_path):
    line = one_error_line(capsys, ["generate", model, "--prompt", "hi", "--record-routing", "/nonexistent/x.jsonl"])
    assert "--record-routing" in line and "/nonexistent/x.jsonl" in line and "does not exist" in line
    line = one_error_line(capsys, ["generate", model, "--prompt", "hi", "--record-routing", tmp_path])
    assert "is a folder" in line
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = one_error_line(capsys, ["generate", model, "--prompt", "hi", "--record-routing", locked / "r.jsonl"])
        assert "not writable" in line and str(locked) in line


@pytest.mark.parametrize("var", ["OFFLOAD_MOE_CACHE", "XDG_CACHE_HOME"])
def test_a_cache_folder_that_is_a_file_is_refused(capsys, monkeypatch, no_load, model, tmp_path, var):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    for value in (afile, afile / "below"):
        monkeypatch.setenv(var, str(value))
        line = one_error_line(capsys, ["chat", model])
        assert f"{var}={str(value)!r}" in line and "is a file" in line


def test_a_model_without_tokenizer_is_refused_before_loading(capsys, no_load, model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (bare / f.name).write_bytes(f.read_bytes())
    line = one_error_line(capsys, ["generate", bare, "--prompt", "hi"])
    assert str(bare) in line and "no tokenizer" in line


@pytest.mark.parametrize("exc, code, text", [
    (PermissionError(13, "Permission denied", "/data/model"), 1, "error: /data/model: Permission denied"),
    (ValueError("transformers says\nno, on two lines"), 1, "transformers says no, on two lines"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (TypeError("a bug"), 1, "unexpected TypeError: a bug"),
])
def test_errors_a_user_can_cause_are_one_line(capsys, monkeypatch, model, exc, code, text):
    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(offload_moe, "load", fail)
    rc = cli.main(["generate", str(model), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == code and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("loading ")]
    assert len(lines) == 1 and text in lines[0], err


def test_debug_is_accepted_after_the_command(capsys, no_load, model):
    assert cli.build_parser().parse_args(["chat", "--debug"]).debug is True
    assert cli.build_parser().parse_args(["--debug", "plan", "x"]).debug is True
    assert cli.build_parser().parse_args(["plan", "x"]).debug is False
    rc = cli.main(["generate", str(model), "--debug", "--top-k", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: --top-k")


def test_usage_errors_are_one_line(capsys):
    line = one_error_line(capsys, ["generate", "--no-such-flag"])
    assert "--no-such-flag" in line
    line = one_error_line(capsys, ["plan", "x", "--gpu", "rtx9999"])
    assert "rtx9999" in line and "rtx4090" in line


def test_a_typo_in_a_variable_name_is_warned_about(capsys, monkeypatch):
    monkeypatch.setenv("OFFLOAD_MOE_SLOT", "4")
    assert cli.main(["plan", "Qwen/Qwen3-30B-A3B", "--cpu-memory", "64GiB"]) == 0
    err = capsys.readouterr().err
    assert "OFFLOAD_MOE_SLOT is not a setting" in err and "OFFLOAD_MOE_SLOTS" in err


def test_plan_refuses_a_config_with_strings(capsys, tmp_path):
    config = json.loads(published_config("mistralai/Mixtral-8x7B-Instruct-v0.1").to_json_string())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": "4096"}))
    line = one_error_line(capsys, ["plan", tmp_path])
    assert "config.json" in line and "hidden_size" in line and "4096" in line


def test_plan_reports_total_ram_and_one_slot_in_the_singular(capsys, tmp_path):
    published_config("mistralai/Mixtral-8x7B-Instruct-v0.1").save_pretrained(tmp_path)
    outputs = []
    for _ in range(2):
        assert cli.main(["plan", str(tmp_path), "--experts", "bf16"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # total RAM, not what happens to be free
    assert "this machine's total RAM" in outputs[0]
    assert "1 expert slot per layer" in outputs[0]


@pytest.mark.parametrize("bad, words", [
    (float("nan"), "finite"), (float("inf"), "finite"), ("nan", "finite"), ("inf GiB", "finite"),
    ("-5GiB", "positive"), (-1, "positive"), (0, "positive"), ("0.1", "positive"),
    (2**60, "at most"), ("2000TiB", "at most"), ("5 parsecs", "not a size"), (True, "not a size"),
])
def test_parse_bytes_refuses_with_the_option_name(bad, words):
    with pytest.raises(ConfigError) as info:
        parse_bytes(bad, "gpu_memory")
    assert f"gpu_memory={bad!r}" in str(info.value) and words in str(info.value)


def test_the_table_drives_the_help_and_the_api(capsys):
    helps = {}
    for command in ("chat", "generate"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        helps[command] = capsys.readouterr().out
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed", "context"):
        opt = OPTIONS[name]
        assert opt.cli_flag in helps["chat"] and opt.env_var in helps["generate"]
    assert check_keyword("top_k", None) is None and check_keyword("temperature", 1) == 1.0
    with pytest.raises(ConfigError, match=r"^top_k=True is not a whole number"):
        check_keyword("top_k", True)


@pytest.mark.parametrize("settings, words", [
    ({"context": -1}, "context=-1"), ({"context": 2**40}, "context="), ({"hybrid": "maybe"}, "hybrid='maybe'"),
    ({"slots_per_layer": 0}, "slots_per_layer=0"), ({"prefetch_top_n": -1}, "prefetch_top_n=-1"),
    ({"gpu_memory": float("nan")}, "gpu_memory=nan"), ({"cpu_memory": "-1GiB"}, "cpu_memory='-1GiB'"),
    ({"policy": "mru"}, "policy='mru'"), ({"optimize": "yes"}, "optimize='yes'"),
])
def test_load_keywords_are_refused_before_any_weight_is_read(monkeypatch, model, settings, words):
    from offload_moe.checkpoint.reader import Checkpoint

    monkeypatch.setattr(Checkpoint, "read", lambda *a, **k: pytest.fail("a weight was read"), raising=False)
    with pytest.raises(ConfigError) as info:
        offload_moe.load(model, device="cpu", progress=False, **settings)
    assert words in str(info.value)


@pytest.fixture(scope="module")
def llm(model):
    with offload_moe.load(model, device="cpu", progress=False) as loaded:
        yield loaded


@pytest.mark.parametrize("kwargs, words", [
    ({"max_new_tokens": 0}, "max_new_tokens=0 must be a whole number >= 1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens=2.5 is not a whole number"),
    ({"top_p": 2}, "top_p=2 must be a finite number in (0, 1]"),
    ({"top_k": -1}, "top_k=-1 must be a whole number >= 0"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty=nan"),
    ({"temperature": -1.0, "do_sample": True}, "temperature=-1.0 must be a finite number >= 0"),
    ({"temperature": float("inf"), "do_sample": True}, "temperature=inf"),
    ({"temperature": "hot"}, "temperature='hot' is a string, not a number"),
    ({"temperature": 0, "do_sample": True}, "temperature=0 with do_sample=True"),
    ({"stop": 5}, "stop=5 must be a string"),
])
def test_generate_stream_and_chat_check_their_keywords(llm, kwargs, words):
    for call in (lambda: llm.generate("hi", **kwargs), lambda: "".join(llm.stream("hi", **kwargs)),
                 lambda: llm.chat([{"role": "user", "content": "hi"}], **kwargs)):
        with pytest.raises(ConfigError) as info:
            call()
        assert words in str(info.value)


def test_good_keywords_still_generate(llm):
    out = llm.generate("hi", max_new_tokens=2, do_sample=True, temperature=0.7, top_p=0.9, top_k=5,
                       repetition_penalty=1.1)
    assert isinstance(out, str)


def _cli(*args, input_bytes=b""):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_MOE_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUTF8="1")
    return subprocess.run([sys.executable, "-m", "offload_moe.cli", *map(str, args)], input=input_bytes,
                          capture_output=True, env=env, timeout=300, cwd=ROOT)


def test_in_a_real_process_a_negative_size_and_binary_stdin_are_one_line(model):
    res = _cli("generate", model, "--prompt", "hi", "--gpu-memory", "-5GiB")
    err = res.stderr.decode()
    assert res.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines() == ["error: --gpu-memory: gpu_memory='-5GiB' must be positive"]
    res = _cli("generate", model, "--max-new-tokens", "2", input_bytes=b"\xff\xfe\x00binary\x80")
    err = res.stderr.decode()
    assert res.returncode == 2 and "Traceback" not in err
    assert "UTF-8" in err.strip().splitlines()[-1]
