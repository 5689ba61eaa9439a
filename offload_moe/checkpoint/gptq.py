"""Reading GPTQ checkpoints in auto-gptq's layout (e.g. TheBloke/Mixtral-8x7B-v0.1-GPTQ).

Pure functions of tensors plus two small readers (the quantization config and one expert
matrix's tensors from a :class:`~offload_moe.checkpoint.reader.Checkpoint`).

The format (auto-gptq 0.7.1 ``QuantLinear.pack``, "gptq" / v1 checkpoint format). A linear layer
``X`` with weight ``W [out, in]`` is stored, instead of ``X.weight``, as:

* ``X.qweight`` int32 ``[in * bits / 32, out]``: codes packed along the INPUT dimension. For one
  output column, the words of its rows form a little-endian bit stream, code ``k`` in bits
  ``[bits*k, bits*(k+1))``. For 2/4/8 bits that is ``32/bits`` codes per word, first code in the
  lowest bits. For 3 bits it is the same bit stream over each run of 3 words (32 codes in 96
  bits), so codes 10 and 21 straddle a word boundary -- auto-gptq's "awkward" 3-bit layout is
  exactly this (bits 30-31 of word 0 plus bit 0 of word 1 hold code 10, ...).
* ``X.qzeros`` int32 ``[n_groups, out * bits / 32]``: zero points, packed the same way along the
  OUTPUT dimension. auto-gptq's v1 format stores ``zero - 1`` (``pack`` does ``zeros -= 1``) and
  its kernels read ``((stored >> shift) & (2**bits - 1)) + 1``; so here the real zero is the
  stored field + 1 (``zero_offset=1``). A real zero of 0 (a group with no negative weight under
  asymmetric quantization) cannot be stored in v1: it is written as -1, which reads back as
  2**bits (and, being 0xFFFFFFFF before the shift, it also sets the bits of the following fields
  of its word); we read exactly what auto-gptq's own kernels read. Symmetric checkpoints (every
  published Mixtral GPTQ) always have zero = 2**(bits-1), stored as 2**(bits-1) - 1. GPTQModel's
  ``checkpoint_format: "gptq_v2"`` stores the real zero (``zero_offset=0``).
* ``X.scales`` fp16 ``[n_groups, out]``.
* ``X.g_idx`` int32 ``[in]``: the group of every input column. ``i // group_size`` without
  act-order (``desc_act: false``), and in general also with ``static_groups``; with
  ``desc_act: true`` it is ``rank(i) // group_size`` where ``rank`` is column i's position in the
  activation order, i.e. a permutation-based assignment.
* optional ``X.bias`` fp16 ``[out]``.

The weight is ``W[o, i] = scales[g, o] * (q[o, i] - zero[g, o])`` with ``g = g_idx[i]``.

Mapping to our affine format (offload_moe.quant.quantize: ``w = (q - zero) * scale`` per group of
consecutive input columns) is exact: codes are the same integers, ``scale`` is the fp16 scale and
``zero`` the (integer, fp16-exact) zero point. When g_idx is not ``i // group_size`` but every
group still has exactly ``group_size`` columns (act-order), sorting the input columns by group
gives a matrix in our format; a layer using it must then permute its input the same way:
``x @ W^T == x[..., perm] @ W_sorted^T`` (see :func:`gptq_to_affine_permuted`).

Which function a loader calls:

* :func:`read_gptq_config` on the model directory;
* :func:`read_gptq_expert` for every (layer, expert, role) -> :class:`GptqTensors`;
* :func:`gptq_to_affine` (or :func:`gptq_to_affine_permuted`) to get a QTensor for the int4
  kernel (``quant.pack`` -> ``qkernels.prepare_for_cpu``), falling back to
  :func:`dequantize_gptq` (fp32 ``[out, in]``, cast to bf16) when it returns None.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from offload_moe.errors import CheckpointError
from offload_moe.quant.quantize import QTensor, unpack_codes
from offload_moe.quant.formats import FORMATS, QuantFormat
from offload_moe.quant.formats import FormatKind

SUPPORTED_BITS = (2, 3, 4, 8)
QUANTIZE_CONFIG_NAME = "quantize_config.json"
KERNEL_GROUPS = (16, 32, 64, 128, 256)  # group sizes qkernels serves (16: expanded to 32)
_FORMAT_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> stored zero + offset = zero


@dataclass(frozen=True)
class GptqConfig:
    """The parts of a GPTQ quantization config the reader needs."""

    bits: int
    group_size: int  # -1 in the file (one group per row) is kept as -1
    desc_act: bool
    sym: bool
    checkpoint_format: str  # "gptq" (auto-gptq v1, zeros stored minus 1) or "gptq_v2"
    source: Path  # the file it was read from
    static_groups: bool = False

    @property
    def zero_offset(self) -> int:
        """What to add to a stored zero point to get the real one (1 for v1, 0 for v2)."""
        return _FORMAT_ZERO_OFFSET[self.checkpoint_format]

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size in (-1, 0) else self.group_size


def read_gptq_config(path: str | Path) -> GptqConfig:
    """The GPTQ config of a model directory (or of a quantize_config.json / config.json file).

    Looks for ``quantize_config.json`` first, then ``config.json["quantization_config"]`` with
    ``quant_method: "gptq"``. CheckpointError naming the file and key when it is missing,
    not GPTQ, or uses something this reader cannot (bits other than 2/3/4/8, a packing format
    other than auto-gptq's "gptq"/"gptq_v2").
    """
    raw, source, where = _raw_gptq_config(Path(path).expanduser())
    return _parse_gptq_config(raw, source, where)


def _raw_gptq_config(path: Path) -> tuple[dict, Path, str]:
    """(the GPTQ config's JSON object, the file it came from, its key prefix in that file)."""
    if path.is_dir():
        qc_path, cfg_path = path / QUANTIZE_CONFIG_NAME, path / "config.json"
    elif path.is_file():  # an explicit file: config.json reads its quantization_config
        qc_path, cfg_path = (None, path) if path.name == "config.json" else (path, None)
    else:
        raise CheckpointError(f"{path}: does not exist (expected a GPTQ model directory)")
    if qc_path is not None and qc_path.is_file():
        raw, source, where = _read_json(qc_path), qc_path, ""
    elif cfg_path is not None and cfg_path.is_file():
        cfg = _read_json(cfg_path)
        raw, source, where = cfg.get("quantization_config"), cfg_path, "quantization_config"
        if not isinstance(raw, dict):
            looked = f"{qc_path} is missing and " if qc_path is not None else ""
            raise CheckpointError(
                f"{cfg_path}: no 'quantization_config' entry ({looked}this is not a GPTQ checkpoint)"
            )
        method = str(raw.get("quant_method", "")).lower()
        if method != "gptq":
            raise CheckpointError(
                f"{cfg_path}: quantization_config.quant_method is {raw.get('quant_method')!r}, not 'gptq'"
            )
    else:
        raise CheckpointError(
            f"{qc_path}: missing, and so is {cfg_path}; a GPTQ checkpoint needs {QUANTIZE_CONFIG_NAME} "
            f"or a 'quantization_config' in config.json"
        )
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object")
    return raw, source, where


def _parse_gptq_config(raw: dict, source: Path, where: str) -> GptqConfig:
    """The checked GptqConfig of a raw config object (errors name `source` and the key)."""

    def key(name: str) -> str:
        return f"{where}.{name}" if where else name

    if "bits" not in raw:
        raise CheckpointError(f"{source}: key {key('bits')!r} is missing")
    bits = raw["bits"]
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise CheckpointError(
            f"{source}: {key('bits')} = {bits!r} is not supported (GPTQ bits must be one of "
            f"{', '.join(map(str, SUPPORTED_BITS))})"
        )
    group_size = raw.get("group_size", -1)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
        raise CheckpointError(f"{source}: {key('group_size')} = {group_size!r} is not a positive integer or -1")
    fmt_key = "checkpoint_format" if "checkpoint_format" in raw else "format"
    checkpoint_format = str(raw.get(fmt_key, "gptq")).lower()
    if checkpoint_format not in _FORMAT_ZERO_OFFSET:
        raise CheckpointError(
            f"{source}: {key(fmt_key)} = {raw.get(fmt_key)!r} is not supported (only auto-gptq's "
            f"packing: 'gptq' or 'gptq_v2')"
        )
    return GptqConfig(
        bits=bits,
        group_size=group_size,
        desc_act=bool(raw.get("desc_act", False)),
        sym=bool(raw.get("sym", True)),
        checkpoint_format=checkpoint_format,
        source=source,
        static_groups=bool(raw.get("static_groups", False)),
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------------------------------------
# unpacking


def _int32_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., n] -> uint8 [..., 4n], each word's bytes least significant first."""
    words = words.contiguous()
    if words.dtype != torch.int32:
        words = words.to(torch.int32)
    if sys.byteorder == "little":
        return words.view(torch.uint8)
    parts = [((words >> (8 * k)) & 0xFF).to(torch.uint8) for k in range(4)]
    return torch.stack(parts, dim=-1).reshape(*words.shape[:-1], -1)


def unpack_gptq_rows(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 [rows, count * bits / 32], codes packed along the last dim -> uint8 [rows, count].

    The words of a row are one little-endian bit stream, code k at bits [bits*k, bits*(k+1)).
    That stream, cut into bytes, is exactly quant.py's canonical 2/3/4-bit byte packing (and
    for 8 bits the bytes are the codes), so quant.unpack_codes does the rest.
    """
    _check_bits(bits)
    data = _int32_bytes(packed)
    if bits == 8:
        return data[..., :count].contiguous()
    return unpack_codes(data, bits, count)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"GPTQ bits = {bits!r} is not supported (one of {SUPPORTED_BITS})")


def _check_fields(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    name: str,
) -> tuple[int, int, int]:
    """(out, in, n_groups) of one GPTQ matrix; CheckpointError on inconsistent shapes or dtypes."""
    _check_bits(bits)
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise CheckpointError(
            f"{name}: qweight, qzeros and scales must be 2-D, got shapes {list(qweight.shape)}, "
            f"{list(qzeros.shape)}, {list(scales.shape)}"
        )
    for field, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype not in (torch.int32, torch.uint32):
            raise CheckpointError(f"{name}.{field}: dtype {t.dtype}, expected int32")
    if not scales.is_floating_point():
        raise CheckpointError(f"{name}.scales: dtype {scales.dtype}, expected a float type (fp16)")
    n_groups, out_features = scales.shape
    in_features = g_idx.shape[0] if g_idx is not None else qweight.shape[0] * 32 // bits
    if (in_features * bits) % 32 or tuple(qweight.shape) != (in_features * bits // 32, out_features):
        raise CheckpointError(
            f"{name}.qweight: shape {list(qweight.shape)}, expected [{in_features} * {bits} / 32, "
            f"{out_features}] = [{in_features * bits / 32:g}, {out_features}] "
            f"(in from g_idx, out from scales)"
        )
    if (out_features * bits) % 32 or tuple(qzeros.shape) != (n_groups, out_features * bits // 32):
        raise CheckpointError(
            f"{name}.qzeros: shape {list(qzeros.shape)}, expected [{n_groups}, {out_features} * {bits} / 32]"
        )
    if g_idx is not None:
        if g_idx.dim() != 1 or g_idx.is_floating_point():
            raise CheckpointError(f"{name}.g_idx: expected a 1-D integer tensor, got {g_idx.dtype} {list(g_idx.shape)}")
        if in_features and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise CheckpointError(
                f"{name}.g_idx: group indices must lie in [0, {n_groups}), got [{int(g_idx.min())}, {int(g_idx.max())}]"
            )
    elif in_features % n_groups:
        raise CheckpointError(f"{name}: no g_idx and {in_features} input columns do not split into {n_groups} groups")
    return out_features, in_features, n_groups


def _default_g_idx(in_features: int, n_groups: int) -> torch.Tensor:
    return torch.arange(in_features, dtype=torch.int64) // (in_features // n_groups)


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    *,
    zero_offset: int = 1,
    name: str = "gptq",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (codes uint8 [out, in], zero int16 [n_groups, out] (real zero points), scales, g_idx int64 [in])."""
    out_features, in_features, n_groups = _check_fields(qweight, qzeros, scales, g_idx, bits, name)
    codes = unpack_gptq_rows(qweight.t(), bits, in_features)  # [out, in]
    zero = unpack_gptq_rows(qzeros, bits, out_features).to(torch.int16) + zero_offset  # [G, out]
    g = g_idx.long() if g_idx is not None else _default_g_idx(in_features, n_groups)
    return codes, zero, scales, g


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    *,
    zero_offset: int = 1,
    name: str = "gptq",
) -> torch.Tensor:
    """The weight [out, in] (float32) one auto-gptq matrix stands for.

    ``W[o, i] = scales[g_idx[i], o] * (q[o, i] - zero[g_idx[i], o])`` computed in fp32 (fp16
    scales are exact in fp32). zero_offset: 1 for auto-gptq's v1 format (the default), 0 for
    gptq_v2 (GptqConfig.zero_offset). g_idx None means ``i // (in / n_groups)``.
    """
    codes, zero, scales, g = unpack_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset=zero_offset, name=name)
    zero_full = zero.float().t().index_select(1, g)  # [out, in]
    scale_full = scales.float().t().index_select(1, g)
    return (codes.float() - zero_full) * scale_full


# ---------------------------------------------------------------------------------------------
# conversion to offload_moe's affine format


def gptq_format(bits: int, group_size: int) -> QuantFormat:
    """Our affine QuantFormat for GPTQ codes of `bits` in groups of `group_size`.

    The registered format when one has exactly these parameters (4/64 is ``hqq4``, 3/64
    ``hqq3``, 2/64 ``hqq2g64``, 2/16 ``hqq2``: same layout and arithmetic, only the name says
    HQQ), otherwise an ad-hoc ``QuantFormat("gptq{bits}g{group}", FormatKind.AFFINE, bits, group)``.
    """
    for fmt in FORMATS.values():
        if fmt.kind is FormatKind.AFFINE and fmt.bits == bits and fmt.group_size == group_size:
            return fmt
    return QuantFormat(f"gptq{bits}g{group_size}", FormatKind.AFFINE, bits, group_size)


def _kernel_group_size(group_size: int, in_features: int) -> tuple[int, int] | None:
    """(group the QTensor uses, how many of those make one GPTQ group), or None if none fits."""
    if group_size in KERNEL_GROUPS:
        return group_size, 1
    if group_size > 256 and group_size % 128 == 0:  # incl. group_size -1 (= in): split, repeat params
        return 128, group_size // 128
    return None


def gptq_to_affine_permuted(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    *,
    zero_offset: int = 1,
    name: str = "gptq",
) -> tuple[QTensor, torch.Tensor | None] | None:
    """Exact conversion into our affine QTensor, sorting input columns by group if needed.

    Returns ``(qt, perm)``: ``perm`` is None when g_idx is ``i // group_size`` (no act-order, or
    act-order with static groups) and then ``dequantize(qt) == dequantize_gptq(...)``. Otherwise
    (act-order) ``perm`` (int64 [in]) sorts the columns by group and
    ``dequantize(qt) == dequantize_gptq(...)[:, perm]``, so ``x @ W^T == x[..., perm] @ dequantize(qt)^T``.
    None when no exact conversion serves the int4 kernel: 8 bits, a group size other than
    16/32/64/128/256 or a multiple of 128, in not a multiple of group_size, or (act-order)
    groups of unequal size. group_size -1 means one group per row.
    """
    out_features, in_features, n_groups = _check_fields(qweight, qzeros, scales, g_idx, bits, name)
    if group_size in (-1, 0):
        group_size = in_features
    if bits not in (2, 3, 4) or in_features % group_size or n_groups != in_features // group_size:
        return None
    kernel = _kernel_group_size(group_size, in_features)
    if kernel is None:
        return None
    codes, zero, scales, g = unpack_gptq(qweight, qzeros, scales, g_idx, bits, zero_offset=zero_offset, name=name)
    trivial = torch.arange(in_features, dtype=torch.int64) // group_size
    perm = None
    if not torch.equal(g, trivial):
        if not torch.equal(torch.bincount(g, minlength=n_groups), torch.full((n_groups,), group_size)):
            return None
        perm = torch.sort(g, stable=True).indices
        codes = codes.index_select(1, perm).contiguous()
    kgroup, repeat = kernel
    scale = scales.t().to(torch.float16)  # [out, G]
    zero_t = zero.t().to(torch.float16)  # integers <= 256: exact in fp16
    if repeat > 1:
        scale = scale.repeat_interleave(repeat, dim=1)
        zero_t = zero_t.repeat_interleave(repeat, dim=1)
    qt = QTensor(
        gptq_format(bits, kgroup),
        (out_features, in_features),
        codes.contiguous(),
        scale.contiguous(),
        zero_t.contiguous(),
    )
    return qt, perm


def gptq_to_affine(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    *,
    zero_offset: int = 1,
    name: str = "gptq",
) -> QTensor | None:
    """Exact conversion into our affine QTensor when g_idx is the trivial ``i // group_size``.

    ``dequantize(qt) == dequantize_gptq(...)`` bit for bit. None for act-order g_idx (use
    :func:`gptq_to_affine_permuted`, or :func:`dequantize_gptq`) and for the cases listed there.
    """
    res = gptq_to_affine_permuted(
        qweight, qzeros, scales, g_idx, bits, group_size, zero_offset=zero_offset, name=name
    )
    if res is None or res[1] is not None:
        return None
    return res[0]


# ---------------------------------------------------------------------------------------------
# reading one expert matrix


@dataclass(frozen=True)
class GptqTensors:
    """The stored tensors of one GPTQ linear layer (`prefix` is its name without `.qweight`)."""

    prefix: str
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    bias: torch.Tensor | None = None

    def dequantize(self, bits: int, *, zero_offset: int = 1) -> torch.Tensor:
        return dequantize_gptq(
            self.qweight, self.qzeros, self.scales, self.g_idx, bits, zero_offset=zero_offset, name=self.prefix
        )


def gptq_prefix(names, layer: int, expert: int, role: str) -> str:
    """On-disk prefix of one expert matrix: the ``....weight`` name `names` (a CheckpointMap)
    gives it, without ``.weight``."""
    name = names.disk_expert_name(layer, expert, role)
    return name[: -len(".weight")] if name.endswith(".weight") else name


def read_gptq_expert(
    ckpt,
    names,
    layer: int,
    expert: int,
    role: str,
    *,
    config: GptqConfig | None = None,
    shape: tuple[int, int] | None = None,
) -> GptqTensors:
    """The GPTQ tensors of one expert matrix (role "gate", "up" or "down") from a Checkpoint.

    E.g. Mixtral layer 0 expert 3 role "gate" reads ``model.layers.0.block_sparse_moe.experts.3.w1``
    ``.qweight/.qzeros/.scales/.g_idx`` (and ``.bias`` if present). With `config` and `shape`
    (the matrix's [out, in] from config.json) every shape is checked against the headers first;
    a missing tensor or wrong shape is a CheckpointError naming the shard file and tensor.
    """
    return read_gptq_linear(ckpt, gptq_prefix(names, layer, expert, role), config=config, shape=shape)


_PACKED_DTYPES = ("I32", "U32")  # auto-gptq packs codes and zeros in 32-bit words
_INDEX_DTYPES = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8")


def _check_stored_dtypes(ckpt, names: dict[str, str]) -> None:
    """The GPTQ tensors' dtypes as their headers give them (before any is read): codes and zeros
    packed in 32-bit words, g_idx integer, scales and bias floating point (an integer header on a
    scale would be cast into a wrong weight silently)."""
    allowed = {"qweight": _PACKED_DTYPES, "qzeros": _PACKED_DTYPES, "g_idx": _INDEX_DTYPES}
    for field, name in names.items():
        if name not in ckpt.tensors:
            continue
        if field in allowed:
            info = ckpt.info(name)
            if info.dtype not in allowed[field]:
                raise CheckpointError(f"{info.file}: tensor {name!r} is stored as {info.dtype}, expected one of "
                                      f"{', '.join(allowed[field])} for GPTQ {field}")
        else:
            ckpt.check_floating(name, f"the GPTQ {field} of a linear layer")


def read_gptq_linear(
    ckpt, prefix: str, *, config: GptqConfig | None = None, shape: tuple[int, int] | None = None, read: bool = True
) -> GptqTensors | None:
    """The GPTQ tensors of the linear layer stored under `prefix` (e.g.
    ``model.layers.0.self_attn.q_proj``), shapes checked against the headers first when `config`
    and `shape` are given. read=False only checks (returns None)."""
    names = {field: f"{prefix}.{field}" for field in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    for field in ("qweight", "qzeros", "scales"):
        ckpt.info(names[field])  # CheckpointError naming the tensor if missing
    has_g_idx = names["g_idx"] in ckpt.tensors
    _check_stored_dtypes(ckpt, names)
    if config is not None and shape is not None:
        out_features, in_features = shape
        bits = config.bits
        group = config.effective_group_size(in_features)
        n_groups = -(-in_features // group)
        expected = {
            "qweight": (in_features * bits // 32, out_features),
            "qzeros": (n_groups, out_features * bits // 32),
            "scales": (n_groups, out_features),
        }
        if has_g_idx:
            expected["g_idx"] = (in_features,)
        for field, want in expected.items():
            info = ckpt.info(names[field])
            if tuple(info.shape) != want:
                raise CheckpointError(
                    f"{info.file}: tensor {names[field]!r} has shape {list(info.shape)}, expected {list(want)} "
                    f"for a [{out_features}, {in_features}] matrix with GPTQ bits={bits}, group_size={config.group_size}"
                )
    if not read:
        return None
    tensors = GptqTensors(
        prefix=prefix,
        qweight=ckpt.read(names["qweight"]),
        qzeros=ckpt.read(names["qzeros"]),
        scales=ckpt.read(names["scales"]),
        g_idx=ckpt.read(names["g_idx"]) if has_g_idx else None,
        bias=ckpt.read(names["bias"]) if names["bias"] in ckpt.tensors else None,
    )
    if config is not None:
        try:
            _check_fields(tensors.qweight, tensors.qzeros, tensors.scales, tensors.g_idx, config.bits, prefix)
        except CheckpointError as exc:
            raise CheckpointError(f"{ckpt.info(names['qweight']).file}: {exc}") from None
    return tensors
