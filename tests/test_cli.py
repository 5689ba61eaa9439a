"""The CLI end to end: through a pseudo-terminal (pexpect) and through piped stdin."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from offload_moe.testing import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FOOTER = re.compile(r"\[(\d+) tokens, [0-9.]+ tok/s, expert hit rate (\d+)%\]")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """Slow enough (4 layers, long context) that a reply can be interrupted."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("cli_model"), seed=5, num_hidden_layers=4, max_position_embeddings=4096
    )


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_MOE_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _cli(*args, input_text=None, **env):
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *map(str, args)],
        input=input_text, capture_output=True, text=True, env=_env(**env), timeout=300, cwd=ROOT,
    )


def test_piped_chat_two_turns_stats_reset(chat_model):
    script = "hello there\n/stats\nand again\n/reset\nthird turn\n/help\n/exit\n"
    res = _cli("chat", chat_model, "--slots", "3", "--max-new-tokens", "6", "--ignore-eos", input_text=script)
    assert res.returncode == 0, res.stderr
    footers = FOOTER.findall(res.stdout)
    assert [int(n) for n, _ in footers] == [6, 6, 6]
    assert re.search(r"layer\s+slots\s+hits\s+misses\s+hit rate\s+copied", res.stdout)
    assert len(re.findall(r"^\s+\d+\s+3\s+\d+\s+\d+\s+[0-9.]+%", res.stdout, re.M)) == 4  # 4 layers, 3 slots
    assert "(conversation cleared)" in res.stdout
    assert "/reset" in res.stdout  # the help text
    assert "Traceback" not in res.stderr
    assert "experts -> host store" in res.stderr  # the load progress bar


def test_env_variables_set_options(chat_model):
    res = _cli("chat", input_text="/stats\n", OFFLOAD_MOE_MODEL=str(chat_model), OFFLOAD_MOE_SLOTS="5")
    assert res.returncode == 0, res.stderr
    assert len(re.findall(r"^\s+\d+\s+5\s+0\s+0", res.stdout, re.M)) == 4


def test_bad_env_value_is_one_line(chat_model):
    res = _cli("chat", chat_model, input_text="", OFFLOAD_MOE_SLOTS="many")
    assert res.returncode != 0
    assert "OFFLOAD_MOE_SLOTS='many' is not a whole number" in res.stderr
    assert "Traceback" not in res.stderr


def test_invalid_model_path_is_one_readable_line(tmp_path):
    res = _cli("chat", tmp_path / "no-such-model", input_text="hi\n")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'no-such-model'}: model path does not exist"
    assert "Traceback" not in res.stderr
    debug = _cli("--debug", "generate", tmp_path / "no-such-model", "--prompt", "hi")
    assert "Traceback" in debug.stderr and debug.returncode == 2


def test_unsupported_architecture_and_impossible_budget(chat_model, tmp_path):
    cfg = json.loads((chat_model / "config.json").read_text())
    other = tmp_path / "llama"
    other.mkdir()
    for f in chat_model.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    res = _cli("generate", other, "--prompt", "hi")
    assert res.returncode == 2 and "model_type 'llama' is not supported" in res.stderr
    res = _cli("generate", chat_model, "--prompt", "hi", "--gpu-memory", "100KB")
    assert res.returncode == 2 and "cannot fit this model" in res.stderr and "give at least" in res.stderr


def test_prompt_longer_than_context(tmp_path):
    small = make_tiny_checkpoint(tmp_path / "small", max_position_embeddings=64)
    res = _cli("generate", small, "--prompt", "x" * 200, "--max-new-tokens", "4")
    assert res.returncode == 2
    assert "longer than the model's context of 64 tokens" in res.stderr


def test_generate_prompt_from_stdin_and_json(chat_model):
    res = _cli("generate", chat_model, "--max-new-tokens", "5", "--ignore-eos", "--json", "--slots", "2",
               input_text="Once upon a time")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert isinstance(out["text"], str)
    assert out["stats"]["total"]["hits"] + out["stats"]["total"]["misses"] > 0
    plain = _cli("generate", chat_model, "--max-new-tokens", "5", "--ignore-eos", "--prompt", "Once upon a time")
    assert plain.stdout.rstrip("\n") == out["text"]  # greedy by default: same text


def _spawn(*args, **env):
    child = pexpect.spawn(
        sys.executable, [str(ROOT / "cli.py"), *map(str, args)], env=_env(**env), encoding="utf-8",
        timeout=120, cwd=str(ROOT),
    )
    child.expect("Chat ready")
    child.expect(">>> ")
    return child


def test_tty_chat_two_turns_stats_reset_and_ctrl_d(chat_model):
    child = _spawn("chat", chat_model, "--slots", "2", "--max-new-tokens", "8", "--ignore-eos")
    child.sendline("hi")
    child.expect(FOOTER)
    assert child.match.group(1) == "8"
    child.expect(">>> ")
    child.sendline("tell me more")
    child.expect(FOOTER)
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"all\s+\d+\s+\d+\s+[0-9.]+%")
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect(r"\(conversation cleared\)")
    child.expect(">>> ")
    child.sendeof()
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_tty_ctrl_c_stops_reply_then_exits(chat_model):
    child = _spawn("chat", chat_model, "--slots", "2", "--max-new-tokens", "3000", "--ignore-eos")
    child.sendline("write a very long story")
    time.sleep(1.5)
    child.sendintr()  # stops the reply, back at the prompt
    child.expect(FOOTER)
    assert int(child.match.group(1)) < 3000
    child.expect(r"\(stopped\)")
    child.expect(">>> ")
    child.sendline("/help")  # still alive
    child.expect("/stats")
    child.expect(">>> ")
    child.sendintr()  # Ctrl-C at the prompt exits cleanly
    child.expect("bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_out_of_memory_while_loading_is_one_line(monkeypatch, capsys, chat_model):
    import offload_moe
    from offload_moe import cli

    def no_memory(*args, **kwargs):
        raise MemoryError("could not allocate 90 GiB")

    monkeypatch.setattr(offload_moe, "load", no_memory)
    rc = cli.main(["generate", str(chat_model), "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3
    assert err[-1].startswith("error: out of memory while loading or running the model")
    assert not any("Traceback" in line for line in err)


def test_convert_command_then_generate_from_the_converted_directory(chat_model, tmp_path):
    res = _cli("convert", chat_model, tmp_path / "converted", "--experts", "hqq4")
    assert res.returncode == 0, res.stderr
    assert "quantizing experts (hqq4)" in res.stderr  # the progress bar
    gen = _cli("generate", tmp_path / "converted", "--prompt", "hi", "--max-new-tokens", "3", "--json")
    assert gen.returncode == 0, gen.stderr
    again = _cli("convert", chat_model, tmp_path / "converted")
    assert again.returncode == 2 and "already exists" in again.stderr
