"""W4A16 on CPU: the canonical format, RTN, GPTQ / AWQ checkpoints built here from their public
layouts (by encoders that know nothing of light_moe.quant), quantize-on-load and `light-moe quantize`.

Every comparison against a float model is exact: a W4A16 layer dequantises to precisely the float
weights written into the reference checkpoint, so float32 greedy tokens and logits are identical."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from light_moe import LightMoEEngine, SamplingParams
from light_moe.cli import main as cli_main
from light_moe.ops.backend import ReferenceOps
from light_moe.quant import QuantizedWeight, W4A16Config, pack_int4, rtn_quantize, unpack_int4
from light_moe.quant.w4a16 import SYMMETRIC_ZERO
from tests.tiny_models import make_tiny_checkpoint

PROMPTS = [[7, 3, 99], list(range(20, 45))]
NEW_TOKENS = 12
EXPERT_RE = re.compile(r"\.experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
ATTN_RE = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight$")
SIZES = {"mixtral": dict(hidden_size=128, intermediate_size=128),
         "qwen3_moe": dict(hidden_size=128, moe_intermediate_size=64)}


# ---- the canonical format -------------------------------------------------------------------

def test_pack_unpack_round_trip():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (3, 5, 64), generator=gen, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5, 8)
    assert torch.equal(unpack_int4(packed), q)
    # value k sits at bits 4 * (k % 8) of word k // 8, low nibble first
    word = int(packed[1, 2, 3]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == q[1, 2, 24:32].tolist()
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rtn_error_within_half_a_step_per_group(group_size, symmetric, dtype):
    gen = torch.Generator().manual_seed(group_size)
    w = (torch.randn(2, 48, 256, generator=gen) * torch.rand(2, 48, 1, generator=gen)).to(dtype)
    w[0, 0, :group_size] = 0.0  # an all-zero group quantizes exactly
    qw = rtn_quantize(w, W4A16Config(group_size, symmetric))
    assert (qw.zeros is None) == symmetric and qw.scales.dtype == dtype
    deq = qw.dequantize().float()
    step = qw.scales.float().repeat_interleave(group_size, dim=-1)
    # in bf16 (unit roundoff u = 2^-8) the scale and the product (q - z) * s (|q - z| <= 8) are each
    # rounded once: at most 7.5u + 8u of a step on top of the half step
    slack = 1e-6 if dtype == torch.float32 else 16 * 2.0 ** -8
    err = (w.float() - deq).abs()
    assert bool((err <= step * (0.5 + slack) + 1e-7).all()), f"max err/step {(err / step).max():.4f}"
    assert bool((deq[0, 0, :group_size] == 0).all())
    if not symmetric:
        assert int(qw.zeros.max()) <= 15


def test_expert_weight_memory_ratio():
    qw = rtn_quantize(torch.randn(2, 256, 1024, dtype=torch.bfloat16), W4A16Config(128, symmetric=True))
    bf16_bytes = 2 * 256 * 1024 * 2
    assert qw.nbytes / bf16_bytes <= 0.26
    qa = rtn_quantize(torch.randn(2, 256, 1024, dtype=torch.bfloat16), W4A16Config(128, symmetric=False))
    assert qa.nbytes / bf16_bytes <= 0.28


def test_ops_with_quantized_experts_equal_dequantized_float():
    gen = torch.Generator().manual_seed(1)
    num_experts, hidden, inter = 4, 64, 96
    x = torch.randn(9, hidden, generator=gen)
    gate = torch.randn(num_experts, hidden, generator=gen)
    w13 = rtn_quantize(torch.randn(num_experts, 2 * inter, hidden, generator=gen), W4A16Config(32, False))
    w2 = rtn_quantize(torch.randn(num_experts, hidden, inter, generator=gen), W4A16Config(32, True))
    ops = ReferenceOps()
    w13p, w2p = ops.prepare_expert_weights(w13, w2)
    out = ops.moe_forward(x, gate, w13p, w2p, 2, True)
    ref = ops.moe_forward(x, gate, w13.dequantize(), w2.dequantize(), 2, True)
    assert torch.equal(out, ref)


def test_scheme_refuses_unsupported_settings():
    with pytest.raises(ValueError, match="group_size must be one of"):
        W4A16Config(group_size=256)
    with pytest.raises(ValueError, match="bits=8"):
        W4A16Config(bits=8)


# ---- public-format encoders (independent of light_moe.quant) --------------------------------

def _quantize_groups(w: np.ndarray, group_of_column: np.ndarray, groups: int, sym: bool):
    """Min-max 4-bit quantization of w [N, K] with the given column -> group map.
    Returns q [N, K] int, scales [N, G] float16, zeros [N, G] int."""
    n, _ = w.shape
    scales = np.zeros((n, groups), np.float16)
    zeros = np.zeros((n, groups), np.int64)
    for g in range(groups):
        cols = w[:, group_of_column == g]
        lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
        if sym:
            amax = np.maximum(-lo, hi)
            s, z = (2 * amax / 15).astype(np.float16), np.full(n, 8)
        else:
            s = ((hi - lo) / 15).astype(np.float16)
            z = np.clip(np.round(-lo / s.astype(np.float32)), 1, 15).astype(np.int64)
        scales[:, g], zeros[:, g] = s, z
    s_col = scales[:, group_of_column].astype(np.float32)
    q = np.clip(np.round(w / s_col) + zeros[:, group_of_column], 0, 15).astype(np.int64)
    return q, scales, zeros


def _dequant(q, scales, zeros, group_of_column) -> torch.Tensor:
    s = torch.from_numpy(scales[:, group_of_column].astype(np.float32))
    z = torch.from_numpy(zeros[:, group_of_column].astype(np.float32))
    return (torch.from_numpy(q.astype(np.float32)) - z) * s


def _pack_rows(values: np.ndarray) -> np.ndarray:
    """AutoGPTQ QuantLinear.pack: [R, C] -> [R // 8, C], row 8i + j at bits 4j (uint32 words)."""
    out = np.zeros((values.shape[0] // 8, values.shape[1]), np.uint32)
    for i in range(out.shape[0]):
        for j in range(8):
            out[i] |= (values[8 * i + j].astype(np.uint32) & 0xF) << (4 * j)
    return out


def _pack_cols(values: np.ndarray, order=tuple(range(8))) -> np.ndarray:
    """[R, C] -> [R, C // 8]: nibble i of word c holds column 8c + order[i] (GPTQ qzeros: identity
    order; AWQ GEMM: [0, 2, 4, 6, 1, 3, 5, 7])."""
    out = np.zeros((values.shape[0], values.shape[1] // 8), np.uint32)
    for c in range(out.shape[1]):
        for i in range(8):
            out[:, c] |= (values[:, 8 * c + order[i]].astype(np.uint32) & 0xF) << (4 * i)
    return out


def _i32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.view(np.int32).copy())


def gptq_encode(w: torch.Tensor, group_size: int, sym: bool, perm: np.ndarray | None, v2: bool):
    """GPTQ tensors of w [N, K] (AutoGPTQ / optimum layout) and their float dequantisation."""
    n, k = w.shape
    groups = k // group_size
    g_idx = np.arange(k) // group_size
    if perm is not None:  # act-order: the j-th channel in quantization order belongs to group j // g
        g_idx = np.empty(k, np.int64)
        g_idx[perm] = np.arange(k) // group_size
    q, scales, zeros = _quantize_groups(w.double().numpy(), g_idx, groups, sym)
    stored_zeros = zeros if v2 else zeros - 1
    tensors = {"qweight": _i32(_pack_rows(q.T)), "qzeros": _i32(_pack_cols(stored_zeros.T)),
               "scales": torch.from_numpy(scales.T.copy()), "g_idx": torch.from_numpy(g_idx.astype(np.int32))}
    return tensors, _dequant(q, scales, zeros, g_idx)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_encode(w: torch.Tensor, group_size: int):
    """AutoAWQ WQLinear_GEMM tensors of w [N, K] and their float dequantisation."""
    n, k = w.shape
    g_idx = np.arange(k) // group_size
    q, scales, zeros = _quantize_groups(w.double().numpy(), g_idx, k // group_size, sym=False)
    tensors = {"qweight": _i32(_pack_cols(q.T, AWQ_ORDER)), "qzeros": _i32(_pack_cols(zeros.T, AWQ_ORDER)),
               "scales": torch.from_numpy(scales.T.copy())}
    return tensors, _dequant(q, scales, zeros, g_idx)


def write_checkpoint(src: Path, dst: Path, tensors: dict, quantization_config: dict | None = None,
                     config_file: str = "config.json") -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    save_file(tensors, str(dst / "model.safetensors"))
    if quantization_config is not None:
        if config_file == "config.json":
            cfg = json.loads((dst / "config.json").read_text())
            cfg["quantization_config"] = quantization_config
            (dst / "config.json").write_text(json.dumps(cfg))
        else:
            (dst / config_file).write_text(json.dumps(quantization_config))
    return dst


def quantized_pair(src: Path, dst: Path, encode, quantization_config, config_file="config.json"):
    """(quantized checkpoint, float checkpoint holding its dequantised weights): experts and
    attention projections quantized; router, norms, embeddings and lm_head float."""
    tensors = load_file(str(src / "model.safetensors"))
    quantized, dequantized = {}, {}
    rng = np.random.default_rng(0)
    perms = {}
    for name, w in tensors.items():
        if not (EXPERT_RE.search(name) or ATTN_RE.search(name)):
            quantized[name] = dequantized[name] = w
            continue
        prefix = name.removesuffix(".weight")
        # act-order: one channel order per input (gate and up of an expert share theirs, as in GPTQ)
        key = re.sub(r"\.(w1|w3|gate_proj|up_proj)$", ".gate_up", prefix)
        key = re.sub(r"\.(q_proj|k_proj|v_proj)$", ".qkv", key)
        perm = perms.setdefault(key, rng.permutation(w.shape[1]))
        encoded, deq = encode(w, perm)
        quantized.update({f"{prefix}.{suffix}": t for suffix, t in encoded.items()})
        dequantized[name] = deq
    q_dir = write_checkpoint(src, dst / "quantized", quantized, quantization_config, config_file)
    f_dir = write_checkpoint(src, dst / "float", dequantized)
    return q_dir, f_dir


def greedy(path, **kwargs):
    engine = LightMoEEngine(path, dtype="float32", device="cpu", show_progress=False, **kwargs)
    outs = engine.generate_outputs(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    return engine, [o.token_ids for o in outs]


def assert_same_model(q_dir: Path, f_dir: Path, **kwargs) -> LightMoEEngine:
    q_engine, q_tokens = greedy(q_dir, **kwargs)
    f_engine, f_tokens = greedy(f_dir)
    assert q_tokens == f_tokens
    for q_block, f_block in zip(q_engine.model.moe_blocks(), f_engine.model.moe_blocks()):
        q13, q2 = q_block.experts.weights()
        assert isinstance(q13, QuantizedWeight)
        assert torch.equal(q13.dequantize(), f_block.experts.w13) and torch.equal(q2.dequantize(), f_block.experts.w2)
    f_params = dict(f_engine.model.named_parameters())
    for name, p in q_engine.model.named_parameters():  # attention dequantized at load time
        assert torch.equal(p, f_params[name]), name
    return q_engine


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def family_checkpoint(request, tmp_path_factory):
    return make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), **SIZES[request.param])


# ---- GPTQ and AWQ checkpoints ----------------------------------------------------------------

@pytest.mark.parametrize("sym,act_order,v2", [(True, False, False), (False, True, False), (True, True, False),
                                              (False, False, True)])
def test_gptq_checkpoint_matches_its_dequantised_float(family_checkpoint, tmp_path, sym, act_order, v2):
    config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": act_order, "sym": sym,
              "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    q_dir, f_dir = quantized_pair(
        family_checkpoint, tmp_path, lambda w, perm: gptq_encode(w, 32, sym, perm if act_order else None, v2), config)
    engine = assert_same_model(q_dir, f_dir)
    w13, _ = engine.model.moe_blocks()[0].experts.weights()
    assert (w13.perm is not None) == act_order and (w13.zeros is None) == sym


def test_gptq_settings_from_quantize_config_json(tmp_path):
    src = make_tiny_checkpoint("mixtral", tmp_path / "src", **SIZES["mixtral"])
    config = {"bits": 4, "group_size": 64, "desc_act": False, "sym": True}  # AutoGPTQ's file
    q_dir, f_dir = quantized_pair(src, tmp_path, lambda w, perm: gptq_encode(w, 64, True, None, False), config,
                                  config_file="quantize_config.json")
    assert_same_model(q_dir, f_dir, quantization="w4a16")  # the checkpoint's own group size wins


def test_awq_checkpoint_matches_its_dequantised_float(family_checkpoint, tmp_path):
    config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    q_dir, f_dir = quantized_pair(family_checkpoint, tmp_path, lambda w, perm: awq_encode(w, 32), config)
    assert_same_model(q_dir, f_dir)


@pytest.mark.parametrize("config,message", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 32}, "bits=8 is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "group_size=-1 is not supported"),
    ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}, "version='gemv' is not supported"),
    ({"quant_method": "fp8"}, "quant_method='fp8' is not supported"),
])
def test_unsupported_checkpoint_settings_are_refused(tmp_path, config, message):
    src = make_tiny_checkpoint("mixtral", tmp_path / "src", **SIZES["mixtral"])
    dst = write_checkpoint(src, tmp_path / "dst", load_file(str(src / "model.safetensors")), config)
    with pytest.raises(ValueError, match=re.escape(message)):
        LightMoEEngine(dst, device="cpu", show_progress=False)


# ---- quantize on load and `light-moe quantize` -----------------------------------------------

@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"), **SIZES["mixtral"])


@pytest.mark.parametrize("group_size,symmetric", [(128, True), (64, False)])
def test_quantize_on_load_matches_dequantised_float(mixtral, tmp_path, group_size, symmetric):
    scheme = W4A16Config(group_size, symmetric)
    tensors = load_file(str(mixtral / "model.safetensors"))
    for name, w in tensors.items():
        if EXPERT_RE.search(name):  # only the routed experts are quantized on load
            tensors[name] = rtn_quantize(w.unsqueeze(0), scheme).dequantize()[0]
    f_dir = write_checkpoint(mixtral, tmp_path / "float", tensors)
    engine = assert_same_model(mixtral, f_dir, quantization="w4a16", quant_group_size=group_size,
                               quant_symmetric=symmetric)
    assert engine.config.quantization == scheme
    w13, w2 = engine.model.moe_blocks()[0].experts.weights()
    assert w13.qweight.shape == (8, 256, 16) and w2.scales.shape == (8, 128, 128 // group_size)


@pytest.mark.parametrize("extra", [[], ["--group-size", "64", "--asymmetric"]])
def test_quantize_command_round_trip(mixtral, tmp_path, extra):
    out = tmp_path / "w4a16"
    assert cli_main(["quantize", "--model", str(mixtral), "--out", str(out), *extra]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == 4
    kwargs = dict(quantization="w4a16", quant_group_size=64 if extra else 128, quant_symmetric=not extra)
    loaded, tokens = greedy(out)
    on_load, expected = greedy(mixtral, **kwargs)
    assert tokens == expected
    for a, b in zip(loaded.model.moe_blocks(), on_load.model.moe_blocks()):
        for qa, qb in zip(a.experts.weights(), b.experts.weights()):
            assert torch.equal(qa.qweight, qb.qweight) and torch.equal(qa.scales, qb.scales)
            assert (qa.zeros is None and qb.zeros is None) or torch.equal(qa.zeros, qb.zeros)


def test_quantize_command_refuses_quant_attention(mixtral, tmp_path, capsys):
    out = tmp_path / "w4a16"
    assert cli_main(["quantize", "--model", str(mixtral), "--out", str(out), "--quant-attention"]) == 2
    assert "--quant-attention is not supported" in capsys.readouterr().err
    assert not out.exists()


def test_quantized_experts_refused_under_expert_parallelism(mixtral):
    with pytest.raises(ValueError, match="expert_parallel_size > 1"):
        LightMoEEngine(mixtral, device="cpu", expert_parallel_size=2, quantization="w4a16", show_progress=False)


def test_symmetric_zero_point_is_eight():
    qw = rtn_quantize(torch.tensor([[[-1.0, 1.0] * 16]]), W4A16Config(32, True))
    assert torch.equal(unpack_int4(qw.qweight)[0, 0, :2].long(), torch.tensor([SYMMETRIC_ZERO - 7, SYMMETRIC_ZERO + 7]))
