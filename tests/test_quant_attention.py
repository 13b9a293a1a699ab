"""W4A16 attention projections (quantization='w4a16' with quant_attention=True) on CPU.

Exact comparisons: a float checkpoint whose experts and q/k/v/o weights are replaced by their RTN
dequantisation is the same model as the quantized engine (float32: identical tokens and logits).
Approximate ones: the quantized model's logits against the float model's, beside the experts-only engine."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from light_moe import LightMoEEngine, SamplingParams
from light_moe.assets import DEMO_MODEL_DIR
from light_moe.bench.perplexity import _window_logits, engine_perplexity
from light_moe.cli import build_parser
from light_moe.cli import main as cli_main
from light_moe.layers.attention import Attention
from light_moe.layers.linear import QuantizedLinear
from light_moe.ops.backend import ReferenceOps
from light_moe.quant import QuantizedWeight, W4A16Config, rtn_quantize
from light_moe.quant.scheme import parse_quantization
from tests.test_quant import ATTN_RE, EXPERT_RE, awq_encode, gptq_encode, quantized_pair, write_checkpoint
from tests.tiny_models import make_tiny_checkpoint

PROMPTS = [[7, 3, 99], list(range(20, 45))]
NEW_TOKENS = 10
# hidden 128 and expert sizes of 64 / 128: every quantized in_features is a multiple of the group sizes used
SIZES = {"mixtral": dict(hidden_size=128, intermediate_size=128),
         "qwen2_moe": dict(hidden_size=128, moe_intermediate_size=64),  # qkv bias
         "qwen3_moe": dict(hidden_size=128, moe_intermediate_size=64),  # per-head q/k norm, head_dim 24
         "olmoe": dict(hidden_size=128, intermediate_size=64)}  # full q/k norm, clip_qkv


@pytest.fixture(scope="module", params=sorted(SIZES))
def family(request, tmp_path_factory):
    return make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), **SIZES[request.param])


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"), **SIZES["mixtral"])


def engine(path, **kwargs) -> LightMoEEngine:
    return LightMoEEngine(path, dtype="float32", device="cpu", show_progress=False, **kwargs)


def greedy(eng: LightMoEEngine) -> list[list[int]]:
    outs = eng.generate_outputs(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    return [o.token_ids for o in outs]


def logits(eng: LightMoEEngine) -> torch.Tensor:
    return _window_logits(eng, PROMPTS[1])  # [S, V] through the paged-cache prefill path


def projections(eng: LightMoEEngine) -> list:
    return [p for m in eng.model.modules() if isinstance(m, Attention) for p in (m.qkv_proj, m.o_proj)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- the option ----------------------------------------------------------------------------------------

def test_scheme_and_parse():
    assert W4A16Config(64, False, attention=True).name == "w4a16-g64-asym-attn"
    assert W4A16Config().name == "w4a16-g128-sym" and not W4A16Config().attention
    assert parse_quantization("w4a16", 32, True, quantize_attention=True) == W4A16Config(32, True, attention=True)
    assert parse_quantization(W4A16Config(64), quantize_attention=True) == W4A16Config(64, attention=True)
    assert parse_quantization("w4a16", 32) == W4A16Config(32)
    with pytest.raises(ValueError, match="needs quantization='w4a16'"):
        parse_quantization(None, quantize_attention=True)


def test_option_without_quantization_errors(mixtral, capsys):
    with pytest.raises(ValueError, match="needs quantization='w4a16'"):
        engine(mixtral, quant_attention=True)
    args = build_parser().parse_args(["generate", "hi", "--model", str(mixtral), "--quant-attention"])
    assert args.quant_attention is True and args.quantization is None
    assert cli_main(["generate", "hi", "--model", str(mixtral), "--device", "cpu", "--quant-attention"]) == 2
    assert "needs quantization='w4a16'" in capsys.readouterr().err
    default = build_parser().parse_args(["generate", "hi"])
    assert default.quant_attention is False


def test_group_size_must_divide_in_features(tmp_path):
    path = make_tiny_checkpoint("qwen3_moe", tmp_path / "q3", **SIZES["qwen3_moe"])  # o_proj in_features 96
    with pytest.raises(ValueError, match="in_features 96 is not a multiple of group_size 64"):
        engine(path, quantization="w4a16", quant_group_size=64, quant_attention=True)


# ---- loading: exact against the dequantised float model ------------------------------------------------

@pytest.mark.parametrize("group_size,symmetric", [(32, True), (32, False)])
def test_quantized_attention_matches_dequantised_float(family, tmp_path, group_size, symmetric):
    scheme = W4A16Config(group_size, symmetric)
    tensors = load_file(str(family / "model.safetensors"))
    for name, w in tensors.items():
        if EXPERT_RE.search(name) or ATTN_RE.search(name):  # q, k, v quantized apart = stacked: RTN is per row
            tensors[name] = rtn_quantize(w.unsqueeze(0), scheme).dequantize()[0]
    f_dir = write_checkpoint(family, tmp_path / "float", tensors)
    q_eng = engine(family, quantization="w4a16", quant_group_size=group_size, quant_symmetric=symmetric,
                   quant_attention=True)
    f_eng = engine(f_dir)
    assert q_eng.config.quantization == W4A16Config(group_size, symmetric, attention=True)
    projs = projections(q_eng)
    assert projs and all(isinstance(p, QuantizedLinear) for p in projs)
    assert all((p.zeros is None) == symmetric for p in projs)
    names = [n for n, _ in q_eng.model.named_parameters()]
    assert not any(n.endswith(("qkv_proj.weight", "o_proj.weight")) for n in names)  # no float copy kept
    for q_attn, f_attn in zip(*[[m for m in e.model.modules() if isinstance(m, Attention)] for e in (q_eng, f_eng)]):
        assert torch.equal(q_attn.qkv_proj.quantized_weight().dequantize()[0], f_attn.qkv_proj.weight)
        assert torch.equal(q_attn.o_proj.quantized_weight().dequantize()[0], f_attn.o_proj.weight)
        assert (q_attn.qkv_proj.bias is None) == (f_attn.qkv_proj.bias is None)
        if f_attn.qkv_proj.bias is not None:  # Qwen2-MoE: the bias stays float, loaded from q/k/v_proj.bias
            assert torch.equal(q_attn.qkv_proj.bias, f_attn.qkv_proj.bias)
    assert torch.equal(logits(q_eng), logits(f_eng))
    assert greedy(q_eng) == greedy(f_eng)


def test_dummy_weights_are_the_float_dummy_model_quantized(mixtral):
    kwargs = dict(load_format="dummy", seed=3)
    q_eng = engine(mixtral, quantization="w4a16", quant_group_size=64, quant_attention=True, **kwargs)
    f_eng = engine(mixtral, **kwargs)
    for q_proj, f_proj in zip(projections(q_eng), [p for m in f_eng.model.modules() if isinstance(m, Attention)
                                                   for p in (m.qkv_proj, m.o_proj)]):
        expected = rtn_quantize(f_proj.weight.unsqueeze(0), W4A16Config(64))
        assert torch.equal(q_proj.qweight, expected.qweight) and torch.equal(q_proj.scales, expected.scales)
    assert len(greedy(q_eng)[1]) == NEW_TOKENS


# ---- accuracy against the float model ------------------------------------------------------------------

def test_close_to_float_model_beside_experts_only():
    """The bundled (trained) demo model on its held-out text (BENCHMARKS.md's figures): quantizing the
    projections too adds error on top of experts-only W4A16 but stays within a small multiple of it (logits
    and perplexity), and greedy generation through the engine works."""
    text = (DEMO_MODEL_DIR / "heldout.txt").read_text()
    engines = {name: engine(DEMO_MODEL_DIR, max_model_len=300, **kwargs) for name, kwargs in (
        ("float", {}), ("experts", dict(quantization="w4a16")),
        ("attention", dict(quantization="w4a16", quant_attention=True)))}
    ids = engines["float"].tokenizer.encode(text)[:200]
    out = {name: _window_logits(eng, ids) for name, eng in engines.items()}
    err_experts, err_attention = rel(out["experts"], out["float"]), rel(out["attention"], out["float"])
    assert 0 < err_experts < 0.1 and err_experts < err_attention < 3 * err_experts, (err_experts, err_attention)
    ppl = {name: engine_perplexity(eng, text, 256)[0] for name, eng in engines.items()}
    assert ppl["float"] < ppl["experts"] < ppl["attention"] < 1.05 * ppl["float"], ppl
    assert (ppl["attention"] - ppl["float"]) < 3 * (ppl["experts"] - ppl["float"]), ppl
    tokens = greedy(engines["attention"])
    assert [len(t) for t in tokens] == [NEW_TOKENS, NEW_TOKENS]


# ---- GPTQ / AWQ checkpoints: quantized attention linears are repacked, not re-quantized -----------------

@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_checkpoint_attention_repacked_exactly(mixtral, tmp_path, method):
    if method == "gptq":
        config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
                  "checkpoint_format": "gptq"}
        encode = lambda w, perm: gptq_encode(w, 32, True, None, False)  # noqa: E731
    else:
        config = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
        encode = lambda w, perm: awq_encode(w, 32)  # noqa: E731
    q_dir, f_dir = quantized_pair(mixtral, tmp_path, encode, config)
    q_eng = engine(q_dir, quantization="w4a16", quant_attention=True)
    f_eng = engine(f_dir)
    f_projs = [p for m in f_eng.model.modules() if isinstance(m, Attention) for p in (m.qkv_proj, m.o_proj)]
    for q_proj, f_proj in zip(projections(q_eng), f_projs, strict=True):
        assert isinstance(q_proj, QuantizedLinear) and q_proj.scheme.group_size == 32
        assert (q_proj.zeros is not None) == (method == "awq")
        assert torch.equal(q_proj.quantized_weight().dequantize()[0], f_proj.weight)
    assert greedy(q_eng) == greedy(f_eng)


def test_act_order_checkpoint_refused(mixtral, tmp_path):
    config = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True}
    q_dir, _ = quantized_pair(mixtral, tmp_path, lambda w, perm: gptq_encode(w, 32, True, perm, False), config)
    with pytest.raises(ValueError, match="act-order"):
        engine(q_dir, quantization="w4a16", quant_attention=True)


# ---- the layer and the ops seam ------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
def test_reference_linear_dequantises(bias):
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    layer = QuantizedLinear(128, 96, bias, W4A16Config(64, symmetric=False), ReferenceOps())
    qw = rtn_quantize(w.unsqueeze(0), W4A16Config(64, symmetric=False))
    layer.load(qw)
    if bias:
        layer.bias.copy_(torch.randn(96))
    layer.prepare()
    assert isinstance(layer.prepared, QuantizedWeight)  # the reference keeps the canonical weight
    x = torch.randn(5, 128)
    expected = F.linear(x, qw.dequantize()[0], layer.bias)
    assert torch.equal(layer(x), expected)
    assert rel(layer(x), F.linear(x, w, layer.bias)) < 0.1  # and it is close to the float layer
    with pytest.raises(ValueError, match="w4a16-g64-sym"):
        layer.load(rtn_quantize(w.unsqueeze(0), W4A16Config(64)))  # a symmetric weight for an asymmetric layer


def test_cute_backend_prepares_or_falls_back():
    """CuteOps (importable on a CPU box) repacks supported bf16 weights and keeps the rest canonical."""
    pytest.importorskip("cutlass")
    from light_moe.kernels.w4a16_layout import W4A16Weights, unpack_prepared
    from light_moe.ops.cute_backend import CuteOps

    ops = CuteOps()
    w = torch.randn(1, 192, 256, dtype=torch.bfloat16)
    qw = rtn_quantize(w, W4A16Config(128))
    prepared = ops.prepare_linear_weight(qw)
    assert isinstance(prepared, W4A16Weights) and prepared.shape == (1, 192, 256) and not prepared.gated
    assert torch.equal(unpack_prepared(prepared), qw.dequantize().float())  # the layout round-trips
    tiny = rtn_quantize(torch.randn(1, 96, 128, dtype=torch.bfloat16), W4A16Config(32))  # N % 64 != 0
    assert ops.prepare_linear_weight(tiny) is tiny
    fp32 = rtn_quantize(torch.randn(1, 128, 128), W4A16Config(32))  # float32 scales
    assert ops.prepare_linear_weight(fp32) is fp32
    x = torch.randn(3, 128)
    assert torch.equal(ops.linear(x, fp32), F.linear(x, fp32.dequantize()[0]))  # the reference path


def test_tile_choice_and_offsets():
    pytest.importorskip("cutlass")
    from light_moe.kernels import w4a16_linear as lin
    from light_moe.kernels.w4a16_gemm import W4A16GroupedGemmSm90

    for n_out, k_dim, group in ((6144, 4096, 128), (4096, 4096, 128), (192, 256, 32), (64, 128, 64), (128, 1408, 64)):
        assert lin.supports(n_out, k_dim, group, torch.bfloat16)[0]
        for tokens in (1, 7, 16, 33, 64, 100, 128, 300, 4096):
            config = lin.choose_linear_tile(tokens, n_out, k_dim, group)
            assert W4A16GroupedGemmSm90.supports(gated=False, n_out=n_out, k_dim=k_dim, num_experts=1,
                                                 group_size=group, config=config)[0], (n_out, k_dim, tokens, config)
    assert lin.choose_linear_tile(1, 6144, 4096, 128).k_split == 4  # decode: split K inside 64-row tiles
    assert not lin.supports(96, 128, 32, torch.bfloat16)[0] and not lin.supports(128, 128, 32, torch.float16)[0]
    device = torch.device("cpu")
    first = lin.one_expert_offsets(5, device)
    assert first.tolist() == [0, 5] and first.dtype == torch.int32 and first.is_contiguous()
    grown = lin.one_expert_offsets(1000, device)  # past the table: a bigger one, the old one kept alive
    assert grown.tolist() == [0, 1000] and lin.one_expert_offsets(5, device).tolist() == [0, 5]
    assert first.tolist() == [0, 5]
