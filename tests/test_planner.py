"""The planner's arithmetic on the real Mixtral-8x7B config (no weights), and `offload-moe plan`."""

from __future__ import annotations

import json

import pytest

from offload_moe import cli
from offload_moe.errors import CheckpointError, ConfigError
from offload_moe.planning.planner import plan_model
from offload_moe.units import parse_bytes
from offload_moe.checkpoint.published import published_config

GiB = 2**30


@pytest.fixture
def mixtral_config():
    """The real Mixtral-8x7B config (offload_moe/checkpoint/published.py: 32 layers, hidden 4096, FFN 14336,
    8 experts, vocab 32000)."""
    return published_config("mistralai/Mixtral-8x7B-Instruct-v0.1")


def test_mixtral_8x7b_arithmetic(mixtral_config):
    plan = plan_model(mixtral_config, "hqq4", 24 * GiB, 64 * GiB, 4096)
    h, f, v, layers = 4096, 14336, 32000, 32
    attention = 2 * h * h + 2 * h * 1024  # q, o [4096, 4096]; k, v [1024, 4096]
    non_expert_params = 2 * v * h + layers * (attention + 2 * h + 8 * h) + h  # embed, head, attn, norms, router
    assert plan.non_expert_bytes == 2 * non_expert_params == 3_211_272_192
    # hqq4, group 64: 4-bit codes + fp16 scale and zero per 64 weights, gate_up [2F, H] and down [H, F]
    gate_up = 2 * f * h // 2 + 2 * (2 * f * h // 64) * 2
    down = h * f // 2 + 2 * (h * f // 64) * 2
    assert plan.expert_bytes == gate_up + down == 99_090_432
    assert plan.slots.kv_cache_bytes == 2 * layers * 4096 * 8 * 128 * 2 == 512 * 2**20
    tile = 2 * (2 * f * h) * 2  # the fused path's bf16 dequantization tile: top-2 experts' gate_up
    assert plan.slots.scratch_bytes == tile
    room = 24 * GiB - plan.non_expert_bytes - plan.slots.kv_cache_bytes - tile
    assert plan.slots.slots_per_layer == room // (layers * plan.expert_bytes) == 6
    assert plan.hit_rate == 0.836  # markov on the real trace at 6 slots
    assert plan.bytes_moved_per_token == pytest.approx(layers * 2 * (1 - 0.836) * plan.expert_bytes)
    assert plan.host_expert_bytes == layers * 8 * plan.expert_bytes and plan.disk_expert_bytes == 0
    # Speed model: more PCIe bandwidth never hurts; hybrid never loses to copying
    slow, fast = plan.tokens_per_s(12e9, 800e9), plan.tokens_per_s(50e9, 800e9)
    assert slow < fast <= plan.tokens_per_s(50e9, 800e9, 60e9)


def test_bf16_experts_spill_to_disk_and_fit_one_slot(mixtral_config):
    plan = plan_model(mixtral_config, "bf16", 24 * GiB, 64 * GiB, 4096)
    assert plan.expert_bytes == 3 * 4096 * 14336 * 2
    assert plan.slots.slots_per_layer == 1
    assert plan.host_expert_bytes == 64 * GiB
    assert plan.disk_expert_bytes == 32 * 8 * plan.expert_bytes - 64 * GiB


def test_impossible_budget_says_what_would_fit(mixtral_config):
    with pytest.raises(ConfigError, match=r"gpu_memory=4.00 GiB cannot fit.*dequantization tile 448.00 MiB.*give at least 6.88 GiB"):
        plan_model(mixtral_config, "hqq4", 4 * GiB, 64 * GiB, 4096)


@pytest.mark.parametrize("text, value", [("24GiB", 24 * GiB), ("16GB", 16 * 10**9), ("512MiB", 512 * 2**20),
                                         ("1.5g", 1_500_000_000), (1024, 1024)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["lots", "-3GB", "12XB", 0])
def test_parse_bytes_refuses(bad):
    with pytest.raises(ConfigError):
        parse_bytes(bad)


def test_plan_command_text_and_json(mixtral_config, tmp_path, capsys):
    mixtral_config.save_pretrained(tmp_path)
    assert cli.main(["plan", str(tmp_path), "--gpu-memory", "24GiB", "--cpu-memory", "64GiB"]) == 0
    text = capsys.readouterr().out
    assert "6 expert slots per layer" in text and "non-expert weights 2.99 GiB" in text and "tok/s" in text
    assert cli.main(["plan", str(tmp_path / "config.json"), "--cpu-memory", "16GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"]["slots_per_layer"] == 6 and data["host"]["disk_expert_bytes"] > 0
    assert set(data["modeled_tokens_per_s"]) >= {"pcie3", "pcie4", "pcie5", "hybrid"}
    assert cli.main(["plan", str(tmp_path), "--gpu-memory", "4GiB"]) == 2
    assert "give at least" in capsys.readouterr().err


def test_qwen3_30b_a3b_many_small_experts():
    """128 experts of 3 x 2048 x 768 per layer, top-8: the plan for a 12 GB and a 24 GB card."""
    config = published_config("Qwen/Qwen3-30B-A3B")
    h, f, layers, v = 2048, 768, 48, 151936
    attention = 4096 * h * 2 + 512 * h * 2 + 2 * 128  # q, o; k, v (4 KV heads x 128); q/k norms
    non_expert_params = 2 * v * h + layers * (attention + 2 * h + 128 * h) + h  # + norms, router; final norm
    expert = 3 * f * h // 2 + 3 * (f * h // 64) * 2 * 2  # 4-bit codes; 16-bit scale and zero per 64 weights
    kv = 2 * layers * 4096 * 4 * 128 * 2
    tile = 8 * (2 * f * h) * 2  # top-8 experts' gate_up in bf16
    for budget, slots in ((12 * GiB, 73), (24 * GiB, 128)):
        plan = plan_model(config, "hqq4", budget, 64 * GiB, 4096)
        assert (plan.moe_layers, plan.num_experts, plan.experts_per_token) == (layers, 128, 8)
        assert plan.non_expert_bytes == 2 * non_expert_params
        assert plan.expert_bytes == expert == 2_654_208
        assert plan.slots.kv_cache_bytes == kv
        assert plan.slots.scratch_bytes == tile
        assert plan.slots.slots_per_layer == slots == min(128, (budget - 2 * non_expert_params - kv - tile) // (layers * expert))


@pytest.mark.parametrize("model", ["mistralai/Mixtral-8x7B-Instruct-v0.1", "Qwen/Qwen3-30B-A3B"])
@pytest.mark.parametrize("fmt", ["hqq4", "hqq2", "nf4", "bf16"])
@pytest.mark.parametrize("budget_gib", [10, 16, 24, 48])
def test_planned_device_memory_stays_within_the_budget(model, fmt, budget_gib):
    """Slots + dequantization tile + non-expert weights + KV cache <= gpu_memory, and one more
    slot per layer would not fit."""
    try:
        plan = plan_model(published_config(model), fmt, budget_gib * GiB, 256 * GiB, 4096)
    except ConfigError:
        return  # refused, saying what would fit (tested above)
    s = plan.slots
    used = s.slot_bytes + s.scratch_bytes + plan.non_expert_bytes + s.kv_cache_bytes
    assert used <= budget_gib * GiB
    assert s.slots_per_layer == plan.num_experts or used + s.moe_layers * s.expert_bytes > budget_gib * GiB
    assert (s.scratch_bytes > 0) == (fmt != "bf16")


def test_deepseek_v2_lite_dense_first_layer_and_shared_experts_stay_on_device():
    plan = plan_model(published_config("deepseek-ai/DeepSeek-V2-Lite-Chat"), "hqq4", 12 * GiB, 64 * GiB, 4096)
    assert (plan.moe_layers, plan.num_experts, plan.experts_per_token) == (26, 64, 6)  # layer 0 is dense
    shared = 26 * 3 * 2048 * (2 * 1408) * 2  # 2 shared experts per MoE layer, bf16, on the device
    dense_mlp = 3 * 2048 * 10944 * 2
    assert plan.non_expert_bytes > shared + dense_mlp


def test_plan_a_published_checkpoint_by_name(capsys):
    assert cli.main(["plan", "Qwen/Qwen3-30B-A3B", "--gpu-memory", "12GiB", "--cpu-memory", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert "48 MoE layers x 128 experts (top-8)" in out and "73 expert slots per layer" in out
    with pytest.raises(CheckpointError, match=r"no/such-model/config.json: missing; .* known checkpoint name: .*Qwen/Qwen3-30B-A3B"):
        cli.run_plan(cli.build_parser().parse_args(["plan", "no/such-model"]))
