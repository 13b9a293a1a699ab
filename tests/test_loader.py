"""Broken checkpoints give errors that name the file, tensor or field at fault."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from light_moe import LightMoEEngine
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))


def copy_of(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def test_missing_tensor_is_named(good, tmp_path):
    path = copy_of(good, tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.3\.w3\.weight is missing"):
        LightMoEEngine(path, show_progress=False)


def test_misshapen_tensor_is_named_with_both_shapes(good, tmp_path):
    path = copy_of(good, tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"q_proj\.weight of shape \[64, 64\], found \[32, 64\]"):
        LightMoEEngine(path, show_progress=False)


def test_unknown_architecture_and_missing_field(good, tmp_path):
    path = copy_of(good, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LightMoEEngine(path, show_progress=False)
    del cfg["num_local_experts"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_local_experts"):
        LightMoEEngine(path, show_progress=False)


def test_unreadable_files_are_named(good, tmp_path):
    path = copy_of(good, tmp_path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        LightMoEEngine(path, show_progress=False)
    (path / "model.safetensors").unlink()
    torch.save({}, path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are never loaded"):
        LightMoEEngine(path, show_progress=False)
    (path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json"):
        LightMoEEngine(path, show_progress=False)


def test_sharded_checkpoint_loads_and_matches(good, tmp_path):
    path = copy_of(good, tmp_path)
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, path / fname)
        weight_map.update({k: fname for k in keys})
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ref = LightMoEEngine(good, dtype="float32", show_progress=False).generate([1, 2, 3], max_tokens=8, temperature=0)
    got = LightMoEEngine(path, dtype="float32", show_progress=False).generate([1, 2, 3], max_tokens=8, temperature=0)
    assert got == ref
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        LightMoEEngine(path, show_progress=False)


def test_missing_tokenizer_is_named(good, tmp_path):
    path = copy_of(good, tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        LightMoEEngine(path, show_progress=False)
