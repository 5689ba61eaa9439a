"""Regenerate tests/data/autogptq_fixture.safetensors with auto-gptq's own code (not ours).

    pip download --no-deps --only-binary :all: --python-version 311 \
        --platform manylinux_2_17_x86_64 auto-gptq==0.7.1 -d /tmp/agq
    python -m zipfile -e /tmp/agq/auto_gptq-0.7.1-*.whl /tmp/agq/ex
    python tests/data/make_autogptq_fixture.py /tmp/agq/ex

auto-gptq is not installed (its package __init__ pulls in CUDA extensions, accelerate, ...):
only its pure-PyTorch modules are imported from the unpacked wheel --
``quantization/gptq.py`` + ``quantizer.py`` (the GPTQ algorithm, act-order included) and
``nn_modules/qlinear/qlinear_cuda.py`` (``QuantLinear.pack`` writes qweight/qzeros/scales/g_idx,
and its CPU forward, which dequantizes in fp16, gives the reference weight).

For each case, a [32, 128] nn.Linear (fp16 weights, seeded) is quantized by GPTQ on random
calibration inputs, packed, and stored as ``<case>.qweight/.qzeros/.scales/.g_idx/.bias`` plus
``<case>.ref_weight`` fp16 [out, in]: auto-gptq's forward on the identity matrix (its
dequantized weight, transposed back) and ``<case>.ref_x`` / ``<case>.ref_y``: one forward.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

CASES = [  # (name, bits, group_size, desc_act, sym)
    ("b4_g32_act", 4, 32, True, True),
    ("b4_g64", 4, 64, False, False),
    ("b4_g128_act_asym", 4, 128, True, False),
    ("b3_g32_act", 3, 32, True, False),
    ("b2_g64", 2, 64, False, False),
    ("b8_g32_act", 8, 32, True, True),
]
OUT_F, IN_F = 32, 128


def _load_auto_gptq(root: Path):
    """Import auto-gptq's pure-torch modules without running its package __init__ files."""
    sys.path.insert(0, str(root))
    for pkg in ("auto_gptq", "auto_gptq.quantization", "auto_gptq.nn_modules", "auto_gptq.nn_modules.qlinear"):
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(root / pkg.replace(".", "/"))]
        sys.modules[pkg] = mod
    torch.cuda.synchronize = lambda *a, **k: None  # fasterquant calls it unconditionally
    gptq = importlib.import_module("auto_gptq.quantization.gptq")
    qlinear = importlib.import_module("auto_gptq.nn_modules.qlinear.qlinear_cuda")
    return gptq.GPTQ, qlinear.QuantLinear


def main(root: str, out: str = str(Path(__file__).with_name("autogptq_fixture.safetensors"))) -> None:
    GPTQ, QuantLinear = _load_auto_gptq(Path(root))
    tensors: dict[str, torch.Tensor] = {}
    for k, (name, bits, group, desc_act, sym) in enumerate(CASES):
        torch.manual_seed(100 + k)
        layer = torch.nn.Linear(IN_F, OUT_F, bias=True)
        # uneven column scales make act-order reorder columns for real
        layer.weight.data = (torch.randn(OUT_F, IN_F) * torch.rand(IN_F) * 0.1).half().float()
        layer.bias.data = layer.bias.data.half().float()
        calib = torch.randn(64, IN_F) * torch.linspace(0.1, 3.0, IN_F)[torch.randperm(IN_F)]
        g = GPTQ(layer)
        g.add_batch(calib, layer(calib))
        g.quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
        scale, zero, g_idx = g.fasterquant(blocksize=128, percdamp=0.01, group_size=group, actorder=desc_act)
        layer.weight.data = layer.weight.data.half()
        layer.bias.data = layer.bias.data.half()
        ql = QuantLinear(bits, group, IN_F, OUT_F, bias=True, weight_dtype=torch.float16)
        ql.pack(layer, scale, zero, g_idx)
        ql.autogptq_cuda_available = False
        with torch.no_grad():
            x = torch.randn(2, IN_F).half()
            y = ql(x)
            bias, ql.bias = ql.bias, None
            ref_t = ql(torch.eye(IN_F, dtype=torch.float16))  # [in, out]: W^T, exactly
            ql.bias = bias
        tensors.update(
            {
                f"{name}.qweight": ql.qweight.contiguous(),
                f"{name}.qzeros": ql.qzeros.contiguous(),
                f"{name}.scales": ql.scales.contiguous(),
                f"{name}.g_idx": ql.g_idx.to(torch.int32).contiguous(),
                f"{name}.bias": ql.bias.contiguous(),
                f"{name}.ref_weight": ref_t.t().contiguous(),
                f"{name}.ref_x": x,
                f"{name}.ref_y": y.contiguous(),
            }
        )
        trivial = torch.equal(ql.g_idx.long(), torch.arange(IN_F) // group)
        print(f"{name}: bits={bits} group={group} desc_act={desc_act} sym={sym} trivial_g_idx={trivial}")
    save_file(tensors, out, metadata={"writer": "auto-gptq 0.7.1 GPTQ.fasterquant + qlinear_cuda.QuantLinear.pack"})
    print("wrote", out, Path(out).stat().st_size, "bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
