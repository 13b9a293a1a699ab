"""EngineArgs is the one home of every engine option (engine/args.py): each option is a flag of every command
that builds an engine, a keyword of LightMoEEngine and reaches the EngineConfig (which the expert-parallel
workers receive whole); bad values are refused before anything is read, on the command line in one line
naming the flag. And the point of it: an option added as one field gets all of that."""
from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass, fields

import pytest
import torch

from light_moe import LightMoEEngine, SamplingParams
from light_moe.assets import DEMO_MODEL_DIR
from light_moe.cli import build_parser, main
from light_moe.cli_args import BENCH_DECIDES
from light_moe.engine.args import SERVER_DEFAULTS, EngineArgs, option
from light_moe.executor.rank_executor import WorkerSpec
from light_moe.models.loader import load_model_config
from tests.tiny_models import make_tiny_checkpoint

OPTIONS = [f.name for f in fields(EngineArgs)]
CPU = torch.device("cpu")

# A valid value away from the default for every option, with the other options it needs (compared against
# those alone). tensor_parallel_size has none (only 1 is supported); device is resolved before the config
# is built (create_engine_config takes the torch.device) and is checked through an engine below.
CHANGED: dict[str, tuple[object, dict]] = {
    "model": ("other/dir", {}),
    "dtype": ("bfloat16", {}),
    "max_model_len": (64, {}),
    "load_format": ("dummy", {}),
    "seed": (7, {}),
    "show_progress": (False, {}),
    "moe_backend": ("reference", {}),
    "enforce_eager": (True, {}),
    "skinny_gemm": (False, {}),
    "skinny_gemm_max_rows": (64, {}),
    "fuse_combine_norm": (False, {}),
    "fuse_attention_merge": (False, {}),
    "w4a16_decode_kernel": ("wgmma", {}),
    "w4a16_prefetch_down": (True, {}),
    "w4a16_fused_decode": (True, {}),
    "warmup_graphs": (True, {}),
    "async_scheduling": (False, {}),
    "async_output_processing": (True, {}),
    "block_size": (32, {}),
    "gpu_memory_utilization": (0.5, {}),
    "kv_cache_memory_bytes": (1 << 20, {}),
    "num_kv_blocks": (64, {}),
    "enable_prefix_caching": (False, {}),
    "max_num_seqs": (8, {}),
    "max_num_batched_tokens": (512, {}),
    "enable_chunked_prefill": (False, {}),
    "expert_parallel_size": (2, {}),
    "expert_placement": ("round_robin", {}),
    "expert_load_file": ("load.json", {}),
    "collective_timeout_s": (10.0, {}),
    "enable_overlap": (True, {}),
    "num_redundant_experts": (1, {}),
    "expert_load_window": (64, {}),
    "rebalance_interval": (10, {}),
    "rebalance_threshold": (1.5, {}),
    "fixed_capacity_tokens": (0, {}),
    "ep_exchange": ("p2p", {"expert_parallel_size": 2}),
    "quantization": ("w4a16", {}),
    "quant_group_size": (64, {"quantization": "w4a16"}),
    "quant_symmetric": (False, {"quantization": "w4a16"}),
    "quant_attention": (True, {"quantization": "w4a16"}),
}
NO_CONFIG_FIELD = {"show_progress": "how the weights load, not what runs"}
NOT_CHANGEABLE = {"tensor_parallel_size": "only 1 is supported", "device": "resolved before the config is built"}


def make(**options) -> EngineArgs:
    return EngineArgs(**{"model": "m", **options})


def subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def flag_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.option_strings}


def test_the_table_covers_every_option():
    assert set(CHANGED) | set(NOT_CHANGEABLE) == set(OPTIONS)
    for name, (value, needs) in CHANGED.items():
        assert getattr(make(**needs, **{name: value}), name) != getattr(make(**needs), name)


# ---- the command line ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command,decided", [
    (("generate",), ()), (("serve",), ()), (("bench", "e2e"), BENCH_DECIDES),
    (("bench", "profile-step"), BENCH_DECIDES), (("bench", "serve"), ("model", "load_format", "seed"))])
def test_every_option_is_a_flag(command, decided):
    parser = subparser(build_parser(), *command)
    assert flag_dests(parser) >= set(OPTIONS) - set(decided)
    text = parser.format_help()
    for f in fields(EngineArgs):
        if f.name not in decided:
            assert f"--{f.name.replace('_', '-')}" in text or f.name == "quant_symmetric"
    assert "--quant-asymmetric" in text or "quant_symmetric" in decided


def test_flag_defaults_are_the_option_defaults():
    parser = build_parser()
    # the server's own default: graphs captured at start (SERVER_DEFAULTS)
    assert EngineArgs.from_cli_args(parser.parse_args(["serve", "--model", "m"])) == EngineArgs("m", warmup_graphs=True)
    assert EngineArgs.from_cli_args(parser.parse_args(["serve", "--model", "m", "--no-warmup-graphs"])) \
        == EngineArgs("m")
    assert EngineArgs.from_cli_args(parser.parse_args(["generate", "hi"]), model="m") == EngineArgs("m")
    e2e = EngineArgs.from_cli_args(parser.parse_args(["bench", "e2e"]), model="m")
    assert e2e == EngineArgs("m", max_num_batched_tokens=8192, show_progress=False)  # a benchmark's defaults


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_each_flag_round_trips(name):
    """EngineArgs -> flags (to_cli_args) -> `light-moe serve`'s parser -> the same EngineArgs."""
    value, needs = CHANGED[name]
    args = make(**needs, **{name: value})
    parsed = build_parser().parse_args(["serve", *args.to_cli_args(SERVER_DEFAULTS)])
    assert EngineArgs.from_cli_args(parsed) == args


def test_server_defaults_round_trip():
    """An option at the engine's default but away from the server's (warmup_graphs off) still reaches the server."""
    for value in (False, True):
        args = make(warmup_graphs=value)
        flags = args.to_cli_args(SERVER_DEFAULTS)
        assert ("--no-warmup-graphs" in flags) == (not value) and "--warmup-graphs" not in flags
        assert EngineArgs.from_cli_args(build_parser().parse_args(["serve", *flags])) == args


def test_existing_flag_spellings_still_parse():
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m", "--no-prefix-caching", "--asymmetric", "--group-size", "32",
                              "--quantization", "w4a16", "--no-async-scheduling", "--enforce-eager"])
    assert EngineArgs.from_cli_args(args) == EngineArgs("m", enable_prefix_caching=False, quant_symmetric=False,
                                                        quant_group_size=32, quantization="w4a16",
                                                        async_scheduling=False, enforce_eager=True,
                                                        warmup_graphs=True)
    profile = parser.parse_args(["bench", "profile-step", "--eager"])
    assert profile.enforce_eager is True
    quantize = parser.parse_args(["quantize", "--model", "a", "--out", "b", "--quant-asymmetric"])
    assert quantize.quant_symmetric is False and not hasattr(quantize, "dtype")


def test_from_cli_args_reads_only_the_options_it_added():
    """bench serve's --seed seeds its request stream, not the server's engine."""
    args = build_parser().parse_args(["bench", "serve", "--seed", "5", "--max-num-seqs", "3"])
    assert args.seed == 5
    assert EngineArgs.from_cli_args(args, model="m") == EngineArgs("m", max_num_seqs=3, warmup_graphs=True)


# ---- the configs and the worker spec -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_cfg():
    return load_model_config(DEMO_MODEL_DIR)[1]


@pytest.mark.parametrize("name", sorted(set(CHANGED) - set(NO_CONFIG_FIELD)))
def test_every_option_reaches_the_engine_config(name, model_cfg):
    value, needs = CHANGED[name]
    before = make(**needs).create_engine_config(model_cfg, CPU)
    after = make(**needs, **{name: value}).create_engine_config(model_cfg, CPU)
    assert after != before


def test_workers_receive_the_engine_config_whole(model_cfg):
    assert [f.name for f in fields(WorkerSpec)] == ["config", "placements"]
    config = EngineArgs("m", expert_parallel_size=2, enable_overlap=True).create_engine_config(model_cfg, CPU)
    spec = WorkerSpec(config, ())
    assert spec.config.parallel.enable_overlap and spec.with_model_path("elsewhere").config.model_path == "elsewhere"
    assert spec.with_model_path("elsewhere").config.parallel == config.parallel


def test_a_config_field_without_an_option_is_an_error():
    @dataclass(frozen=True)
    class Grown:
        block_size: int = 16
        new_knob: int = 0

    assert EngineArgs("m", block_size=8)._fill(Grown, new_knob=1) == Grown(8, 1)
    with pytest.raises(TypeError, match="Grown.new_knob has no EngineArgs option"):
        EngineArgs("m")._fill(Grown)


# ---- the engine --------------------------------------------------------------------------------------------
def test_engine_signature_lists_every_option():
    params = inspect.signature(LightMoEEngine).parameters
    for f in fields(EngineArgs)[1:]:
        assert params[f.name].default == f.default and params[f.name].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"))


def test_engine_keywords_reach_the_engine(ckpt):
    options = dict(dtype="float32", device="cpu", block_size=8, num_kv_blocks=40, max_num_seqs=3,
                   max_num_batched_tokens=48, enable_chunked_prefill=False, enforce_eager=True, seed=3,
                   max_model_len=96, async_scheduling=False, enable_prefix_caching=False, show_progress=False)
    engine = LightMoEEngine(ckpt, **options)
    assert engine.args == EngineArgs(ckpt, **options)
    cfg = engine.config
    assert (cfg.device, cfg.dtype, cfg.max_model_len, cfg.seed) == (CPU, torch.float32, 96, 3)
    assert (cfg.cache.block_size, cfg.cache.num_blocks, cfg.cache.enable_prefix_caching) == (8, 40, False)
    assert engine.runner.num_blocks == 40 and engine.block_manager.block_size == 8
    assert engine.scheduler.config == cfg.scheduler == cfg.scheduler.__class__(3, 48, False)
    assert not cfg.enable_cuda_graphs and not cfg.async_scheduling
    tokens = engine.generate_outputs([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0))[0].token_ids
    again = LightMoEEngine.from_engine_args(EngineArgs(ckpt, **options))
    assert again.generate_outputs([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0))[0].token_ids == tokens
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_num_seq'"):
        LightMoEEngine(ckpt, max_num_seq=3)
    with pytest.raises(TypeError, match="given with an EngineArgs"):
        LightMoEEngine(EngineArgs(ckpt), seed=1)


# ---- bad values: refused before anything is read --------------------------------------------------------
@pytest.fixture
def nothing_read(monkeypatch):
    """The engine's first read (config.json) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was read")

    monkeypatch.setattr("light_moe.engine.engine.load_model_config", refuse)


BAD = [("max_num_seqs", 0, "--max-num-seqs"), ("block_size", 12, "--block-size"),
       ("gpu_memory_utilization", 1.5, "--gpu-memory-utilization"), ("num_kv_blocks", 0, "--num-kv-blocks"),
       ("dtype", "int8", "--dtype"), ("device", "tpu", "--device"), ("max_model_len", -1, "--max-model-len"),
       ("expert_parallel_size", 0, "--expert-parallel-size"), ("rebalance_threshold", 0.5, "--rebalance-threshold"),
       ("quant_attention", True, "--quant-attention"), ("ep_exchange", "p2p", "--ep-exchange"),
       ("skinny_gemm_max_rows", 65, "--skinny-gemm-max-rows")]


@pytest.mark.parametrize("name,value,flag", BAD)
def test_bad_values_are_refused_before_anything_is_read(name, value, flag, nothing_read):
    with pytest.raises(ValueError) as error:
        LightMoEEngine("/nonexistent/model", **{name: value})
    assert EngineArgs._name_the_flag(str(error.value)).startswith(f"argument {flag}: ")


def cli_value(value) -> list[str]:
    return [] if value is True else [str(value)]


@pytest.mark.parametrize("command,name,value,flag", [
    (command, *bad) for command in (["generate", "hi"], ["serve"], ["bench", "e2e"]) for bad in BAD
    if command[0] != "bench" or bad[0] not in BENCH_DECIDES])
def test_a_bad_flag_fails_in_one_line_naming_it(command, name, value, flag, nothing_read, capsys):
    assert main([*command, "--model", "/nonexistent/model", flag, *cli_value(value)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: argument {flag}:"), err


def test_two_options_that_do_not_go_together(nothing_read):
    with pytest.raises(ValueError, match="expert_parallel_size > 1"):
        LightMoEEngine("/nonexistent/model", quantization="w4a16", expert_parallel_size=2)
    with pytest.raises(ValueError, match="expert_load_file"):
        EngineArgs("m", expert_placement="load_aware")
    with pytest.raises(ValueError, match="enforce_eager must be True or False"):
        EngineArgs("m", enforce_eager="yes")


# ---- adding an option: one field ----------------------------------------------------------------------------
def test_an_option_added_as_one_field_gets_a_flag_a_check_and_its_config():
    @dataclass(frozen=True)
    class GrownArgs(EngineArgs):
        lookahead_steps: int = option(0, "steps scheduled ahead", group="scheduler", choices=(0, 1, 2))

    @dataclass(frozen=True)
    class GrownScheduler:
        max_num_seqs: int = 256
        lookahead_steps: int = 0

    parser = GrownArgs.add_cli_args(argparse.ArgumentParser())
    assert "--lookahead-steps" in parser.format_help()
    args = GrownArgs.from_cli_args(parser.parse_args(["--model", "m", "--lookahead-steps", "2"]))
    assert args.lookahead_steps == 2 and args._fill(GrownScheduler) == GrownScheduler(256, 2)
    assert GrownArgs.from_cli_args(parser.parse_args(args.to_cli_args())) == args
    with pytest.raises(ValueError, match="lookahead_steps must be one of"):
        GrownArgs("m", lookahead_steps=5)
