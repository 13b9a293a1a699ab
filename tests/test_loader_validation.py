"""config.json, generation_config.json and the checkpoint are validated before anything is allocated
(docs/model_loading.md): absurd sizes, wrong types, shapes and dtypes that disagree with the
safetensors headers, and shard paths outside the model directory are errors that name the field,
tensor or file at fault."""
import json
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from light_moe import LightMoEEngine
from light_moe.config import MAX_PARAMETERS, MODEL_LIMITS, ModelConfig
from light_moe.models.base import MoECausalLM
from light_moe.models.loader import CheckpointIndex, load_model_config
from light_moe.models.qwen2_moe import Qwen2MoeForCausalLM
from light_moe.quant.scheme import W4A16Config
from light_moe.quantize import quantize_checkpoint
from tests.test_loader import copy_of
from tests.tiny_models import _config, make_tiny_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


def edit_tensors(path, **changes):
    tensors = load_file(path / "model.safetensors")
    tensors.update({name.replace("__", "."): t for name, t in changes.items()})
    save_file(tensors, path / "model.safetensors")


@pytest.fixture
def no_allocation(monkeypatch):
    """Fails the test if the loader gets as far as materialising the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was allocated before the checkpoint was validated")
    monkeypatch.setattr(MoECausalLM, "to_empty", refuse)


def load(path, **kwargs):
    return LightMoEEngine(path, dtype="float32", device="cpu", show_progress=False, **kwargs)


# ---- config.json: sizes and types ------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", 10**9, "config.json: hidden_size must be at most 65536, got 1000000000"),
    ("vocab_size", 10**12, "config.json: vocab_size must be at most 4194304, got 1000000000000"),
    ("num_local_experts", 10**6, "config.json: num_local_experts must be at most 4096, got 1000000"),
    ("max_position_embeddings", 10**12, "config.json: max_position_embeddings must be at most 1048576, got 10000"),
    ("num_hidden_layers", 100_000, "config.json: num_hidden_layers must be at most 1024, got 100000"),
    ("num_attention_heads", 0, "config.json: num_attention_heads must be at least 1, got 0"),
    ("intermediate_size", -5, "config.json: intermediate_size must be at least 0, got -5"),
])
def test_absurd_sizes_are_refused_before_allocation(good, tmp_path, no_allocation, field, value, message):
    path = copy_of(good, tmp_path)
    edit_config(path, **{field: value})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(message)):
        load(path)
    assert time.perf_counter() - start < 5.0  # 100,000 layers once took minutes of validation


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", "128", "config.json: hidden_size must be an integer, got '128'"),
    ("num_hidden_layers", 3.0, "config.json: num_hidden_layers must be an integer, got 3.0"),
    ("num_experts_per_tok", True, "config.json: num_experts_per_tok must be an integer, got True"),
    ("rms_norm_eps", "1e-5", "config.json: rms_norm_eps must be a finite number, got '1e-5'"),
    ("tie_word_embeddings", "false", "config.json: tie_word_embeddings must be true or false, got 'false'"),
    ("eos_token_id", "2", "config.json: eos_token_id must be an integer, got '2'"),
    ("eos_token_id", [2, -1], "config.json: eos_token_id must be at least 0, got -1"),
    ("sliding_window", 0, "config.json: sliding_window must be at least 1, got 0"),
    ("rope_parameters", "linear", "rope_parameters / rope_scaling must be an object"),
    ("torch_dtype", 16, "torch_dtype must be a string"),
])
def test_wrong_types_name_the_field(good, tmp_path, field, value, message):
    path = copy_of(good, tmp_path)
    edit_config(path, **{field: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        load_model_config(path)


def test_config_json_must_be_an_object(good, tmp_path):
    path = copy_of(good, tmp_path)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json must hold a JSON object, got list"):
        load_model_config(path)


@pytest.mark.parametrize("changes,message", [
    (dict(mlp_only_layers="1"), "config.json: mlp_only_layers must be a list of layer indices"),
    (dict(mlp_only_layers=[7]), "config.json: mlp_only_layers entry must be at most 2, got 7"),
    (dict(decoder_sparse_step=0), "config.json: decoder_sparse_step must be at least 1, got 0"),
    (dict(num_experts="8"), "config.json: num_experts must be an integer, got '8'"),
    (dict(shared_expert_intermediate_size=2**20), "shared_expert_intermediate_size must be at most 262144"),
    (dict(use_sliding_window="yes"), "config.json: use_sliding_window must be true or false"),
])
def test_qwen_moe_fields_are_checked(changes, message):
    hf = {**_config("qwen2_moe").to_dict(), **changes}
    with pytest.raises(ValueError, match=re.escape(message)):
        Qwen2MoeForCausalLM.parse_config(hf)


def model_config(**changes) -> ModelConfig:
    fields = dict(architecture="test", vocab_size=16, hidden_size=64, num_layers=4, num_heads=2, num_kv_heads=2,
                  head_dim=32, max_position_embeddings=16, rms_norm_eps=1e-5, rope_theta=1e4, num_experts=4,
                  top_k=2, moe_intermediate_size=32, norm_topk_prob=True, intermediate_size=32,
                  moe_layers=(1, 3))
    return ModelConfig(**{**fields, **changes})


def test_model_config_bounds_and_moe_layers():
    cfg = model_config()
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    big = MODEL_LIMITS["num_layers"]
    start = time.perf_counter()
    wide = model_config(num_layers=big, moe_layers=tuple(range(0, big, 2)))
    assert sum(wide.is_moe_layer(i) for i in range(big)) == big // 2
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ValueError, match=re.escape("num_layers (config.json num_hidden_layers) must be at most 1024")):
        model_config(num_layers=big + 1)
    with pytest.raises(ValueError, match="moe_layers must be ascending without repeats"):
        model_config(moe_layers=(3, 1))
    with pytest.raises(ValueError, match="moe_layers entry must be at most 3, got 4"):
        model_config(moe_layers=(1, 4))
    with pytest.raises(ValueError, match=r"layers \[0, 2\] are dense but intermediate_size is 0"):
        model_config(intermediate_size=0)
    with pytest.raises(ValueError, match="hidden_size must be an integer, got '64'"):
        model_config(hidden_size="64")
    # every size under its own maximum, the product far above any model
    with pytest.raises(ValueError, match=re.escape(f"above the supported maximum {MAX_PARAMETERS:.3g}")):
        model_config(hidden_size=1 << 16, num_heads=128, num_kv_heads=128, head_dim=512, num_layers=1024,
                     num_experts=4096, moe_intermediate_size=1 << 18, moe_layers=tuple(range(1024)))


# ---- the checkpoint against the config: shapes and dtypes from the headers -------------------

@pytest.mark.parametrize("changes,message", [
    (dict(hidden_size=128), "expected tensor model.embed_tokens.weight of shape [320, 128], found [320, 64]"),
    (dict(vocab_size=400), "expected tensor model.embed_tokens.weight of shape [400, 64], found [320, 64]"),
    (dict(intermediate_size=128),
     "expected tensor model.layers.0.block_sparse_moe.experts.0.w1.weight of shape [128, 64], found [96, 64]"),
    (dict(num_local_experts=16),
     "expected tensor model.layers.0.block_sparse_moe.gate.weight of shape [16, 64], found [8, 64]"),
    (dict(num_hidden_layers=4), "checkpoint tensor model.layers.3.input_layernorm.weight is missing"),
])
def test_config_that_disagrees_with_the_weights_fails_before_allocation(good, tmp_path, no_allocation, changes,
                                                                          message):
    path = copy_of(good, tmp_path)
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        load(path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int16, torch.float64])
def test_float_parameter_of_another_dtype_is_refused(good, tmp_path, no_allocation, dtype):
    path = copy_of(good, tmp_path)
    lm_head = load_file(path / "model.safetensors")["lm_head.weight"]
    edit_tensors(path, lm_head__weight=(lm_head * 100).to(dtype))
    stored = {torch.int8: "I8", torch.bool: "BOOL", torch.int16: "I16", torch.float64: "F64"}[dtype]
    message = f"checkpoint tensor lm_head.weight in model.safetensors has dtype {stored}; a float tensor must be one of"
    with pytest.raises(ValueError, match=re.escape(f"{message} F16, BF16, F32")):
        load(path)


def test_int8_expert_is_refused(good, tmp_path, no_allocation):
    path = copy_of(good, tmp_path)
    name = "model.layers.2.block_sparse_moe.experts.5.w2.weight"
    w = load_file(path / "model.safetensors")[name]
    edit_tensors(path, **{name.replace(".", "__"): w.to(torch.int8)})
    with pytest.raises(ValueError, match=re.escape(f"checkpoint tensor {name} in model.safetensors has dtype I8")):
        load(path)


def test_half_precision_checkpoints_load(good, tmp_path):
    ref = load(good).generate([1, 2, 3], max_tokens=6, temperature=0)
    for dtype in (torch.bfloat16, torch.float16):
        path = copy_of(good, tmp_path / str(dtype))
        tensors = load_file(path / "model.safetensors")
        save_file({k: v.to(dtype) for k, v in tensors.items()}, path / "model.safetensors")
        assert len(load(path).generate([1, 2, 3], max_tokens=6, temperature=0)) == len(ref)


@pytest.fixture(scope="module")
def gptq(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    src = make_tiny_checkpoint("mixtral", root / "src", hidden_size=128, intermediate_size=128)
    return quantize_checkpoint(src, root / "gptq", W4A16Config(group_size=64))


@pytest.mark.parametrize("suffix,dtype,message", [
    ("qweight", torch.float32, "has dtype F32; a GPTQ qweight tensor must be one of I32"),
    ("qzeros", torch.int64, "has dtype I64; a GPTQ qzeros tensor must be one of I32"),
    ("scales", torch.int32, "has dtype I32; a GPTQ scales tensor must be one of F16, BF16, F32"),
    ("g_idx", torch.float32, "has dtype F32; a GPTQ g_idx tensor must be one of I32, I64"),
])
def test_quantized_tensor_dtypes_are_checked(gptq, tmp_path, no_allocation, suffix, dtype, message):
    path = copy_of(gptq, tmp_path)
    name = f"model.layers.1.block_sparse_moe.experts.2.w1.{suffix}"
    t = load_file(path / "model.safetensors")[name]
    edit_tensors(path, **{name.replace(".", "__"): t.view(dtype) if dtype.itemsize == 4 else t.to(dtype)})
    with pytest.raises(ValueError, match=re.escape(f"checkpoint tensor {name} in model.safetensors {message}")):
        load(path)


def test_quantized_tensor_shape_is_checked(gptq, tmp_path, no_allocation):
    path = copy_of(gptq, tmp_path)
    name = "model.layers.0.block_sparse_moe.experts.0.w2.scales"
    edit_tensors(path, **{name.replace(".", "__"): load_file(path / "model.safetensors")[name][:1]})
    with pytest.raises(ValueError, match=re.escape(f"expected tensor {name} of shape [2, 128], found [1, 128]")):
        load(path)


def test_gptq_checkpoint_still_loads(gptq):
    engine = load(gptq)
    assert engine.model.moe_blocks()[0].experts.weights()[0].group_size == 64


# ---- shard paths of model.safetensors.index.json ---------------------------------------------

def sharded(good, tmp_path, shard_names: list[str]):
    """A copy of `good` whose tensors are split over shards with the given names (written where
    they point, when that is inside tmp_path)."""
    path = copy_of(good, tmp_path)
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, shard in enumerate(shard_names):
        keys = names[i::len(shard_names)]
        target = path / shard if shard and not shard.startswith("/") else None
        if target is not None and target.resolve().is_relative_to(tmp_path.resolve()):
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: tensors[k] for k in keys}, target)
        weight_map.update({k: shard for k in keys})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.mark.parametrize("shard,message", [
    ("../outside.safetensors", "must be relative to the model directory, without '..'"),
    ("sub/../../outside.safetensors", "without '..'"),
    ("/etc/passwd", "must be relative to the model directory"),
    ("", "a shard file name is empty"),
])
def test_shard_paths_outside_the_model_directory_are_refused(good, tmp_path, shard, message):
    path = sharded(good, tmp_path, ["model-1.safetensors", shard])
    with pytest.raises(ValueError, match=re.escape(message)):
        CheckpointIndex(path)
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        load(path)


def test_symlinks_out_of_the_model_directory_are_refused(good, tmp_path):
    path = sharded(good, tmp_path, ["model-1.safetensors", "model-2.safetensors"])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (path / "model-2.safetensors").rename(outside / "model-2.safetensors")
    (path / "model-2.safetensors").symlink_to(outside / "model-2.safetensors")
    with pytest.raises(ValueError, match=r"shard 'model-2\.safetensors' resolves to .*elsewhere.*, outside the model"):
        CheckpointIndex(path)
    (path / "model-2.safetensors").unlink()
    (path / "linked").symlink_to(outside)  # a directory link out
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v.replace("model-2", "linked/model-2") for k, v in index["weight_map"].items()}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shard 'linked/model-2\.safetensors' resolves to .*outside the model"):
        CheckpointIndex(path)


def test_index_must_map_names_to_file_names(good, tmp_path):
    path = sharded(good, tmp_path, ["model-1.safetensors"])
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model-1.safetensors"]}))
    with pytest.raises(ValueError, match="weight_map must map tensor names to shard files"):
        CheckpointIndex(path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": 3}}))
    with pytest.raises(ValueError, match="shard file name 3 is not a file name"):
        CheckpointIndex(path)


def test_shards_in_a_subdirectory_and_the_hf_cache_layout_load(good, tmp_path):
    ref = load(good).generate([1, 2, 3], max_tokens=6, temperature=0)
    path = sharded(good, tmp_path / "sub", ["model-1.safetensors", "shards/model-2.safetensors"])
    assert load(path).generate([1, 2, 3], max_tokens=6, temperature=0) == ref
    # huggingface_hub's cache: snapshots/<rev>/<file> links to ../../blobs/<hash>
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(path, snapshot)
    (repo / "blobs").mkdir()
    for i, shard in enumerate(["model-1.safetensors", "shards/model-2.safetensors"]):
        (snapshot / shard).rename(repo / "blobs" / f"hash{i}")
        depth = "../" * (shard.count("/") + 2)
        (snapshot / shard).symlink_to(f"{depth}blobs/hash{i}")
    assert load(snapshot).generate([1, 2, 3], max_tokens=6, temperature=0) == ref


# ---- generation_config.json ------------------------------------------------------------------

@pytest.mark.parametrize("text,message", [
    ("{broken", "generation_config.json is not readable JSON"),
    ("[1, 2]", "generation_config.json must hold a JSON object, got list"),
    (json.dumps({"eos_token_id": "2"}), "generation_config.json: eos_token_id must be an integer, got '2'"),
    (json.dumps({"eos_token_id": [1, 2.5]}), "generation_config.json: eos_token_id must be an integer, got 2.5"),
    (json.dumps({"bos_token_id": -3}), "generation_config.json: bos_token_id must be at least 0, got -3"),
    (json.dumps({"pad_token_id": "x"}), "generation_config.json: pad_token_id must be an integer"),
])
def test_malformed_generation_config_fails_before_the_weights_load(good, tmp_path, monkeypatch, text, message):
    path = copy_of(good, tmp_path)
    (path / "generation_config.json").write_text(text)

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before generation_config.json was validated")
    monkeypatch.setattr("light_moe.engine.engine.build_model", refuse)
    with pytest.raises(ValueError, match=re.escape(message)):
        load(path)


def test_generation_config_eos_ids_stop_generation(good, tmp_path):
    path = copy_of(good, tmp_path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7], "bos_token_id": 1}))
    assert load_model_config(path)[1].eos_token_ids == (5, 7)
    assert {5, 7} <= load(path).eos_token_ids
