"""EngineArgs: every option of LightMoEEngine, once: default, type, help and checks, its CLI flag, and the
config it fills.

    EngineArgs(model, **options)          checked on construction, before anything is read or loaded
      .add_cli_args(parser) / .from_cli_args(args)   the flags (generated from the fields) and back
      .create_engine_config(model_cfg, device) -> EngineConfig: cache, parallel, scheduler, quantization, ...
    LightMoEEngine(model, **options) builds an EngineArgs; expert-parallel workers receive the EngineConfig
    whole (executor/rank_executor.WorkerSpec).

Adding an option: one field here (`option(default, help, group=...)`), a field of the same name in the config
of config.py that carries it to where it is used (EngineArgs fills configs by field name; see _fill), and the
use. The flag of every command, the engine keyword and the worker spec follow; tests/test_engine_args.py fails
when one does not.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

import torch

from light_moe.config import (
    EP_EXCHANGES,
    LOAD_FORMATS,
    PLACEMENT_STRATEGIES,
    QUANTIZATION_METHODS,
    SKINNY_GEMM_MAX_ROWS,
    SUPPORTED_GROUP_SIZES,
    W4A16_DECODE_KERNELS,
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
    W4A16Config,
    parse_dtype,
)
from light_moe.engine.devices import resolve_dtype
from light_moe.ops.backend import BACKEND_NAMES
from light_moe.quant.scheme import parse_quantization

if TYPE_CHECKING:
    from light_moe.config import ModelConfig

logger = logging.getLogger("light_moe.engine.engine")  # the engine's log: these messages come from its constructor

__all__ = ["EngineArgs", "options_signature"]


@dataclass(frozen=True)
class _Flag:
    """How an option shows on the command line (field metadata)."""

    help: str
    group: str
    choices: tuple | None = None
    flags: tuple[str, ...] = ()  # default: --name-with-dashes
    negate: bool = False  # a bool whose flags store False (--quant-asymmetric sets quant_symmetric=False)
    config_name: str | None = None  # its name in the config it fills, where that differs


def option(default, help: str, *, group: str, **flag) -> Any:
    return field(default=default, metadata={"flag": _Flag(help, group, **flag)})


@dataclass(frozen=True)
class EngineArgs:
    """The options of LightMoEEngine. Bool options default False are `--x` flags, default True `--x/--no-x`."""

    model: str | Path = field(metadata={"flag": _Flag(
        "Hugging Face model directory (config.json, tokenizer.json, *.safetensors)", "model")})
    dtype: str | torch.dtype = option(
        "auto", "auto | float32 | bfloat16 | float16 (auto: float32 on CPU, the checkpoint's half type or "
        "bfloat16 on GPU)", group="model")
    device: str | torch.device = option("auto", "auto | cpu | cuda", group="model")
    max_model_len: int | None = option(
        None, "context window in tokens (default: the model's, capped at its sliding window)", group="model")
    load_format: str = option(
        "auto", "auto: the checkpoint's safetensors; dummy: random weights, only config.json and the tokenizer "
        "are read (benchmarks)", group="model", choices=LOAD_FORMATS)
    seed: int = option(0, "seed of the engine's sampling and of dummy weights", group="model")
    show_progress: bool = option(True, "a progress bar while the weights load", group="model")
    moe_backend: str = option(
        "auto", "MoE kernels: auto picks CuTe on sm_90 GPUs, else the PyTorch reference", group="execution",
        choices=BACKEND_NAMES)
    enforce_eager: bool = option(False, "no CUDA graphs (decode and piecewise prefill)", group="execution")
    skinny_gemm: bool = option(
        True, "decode rows of the attention projections and the lm_head on the CuTe skinny GEMM instead of cuBLAS "
        "(docs/kernels.md, Skinny GEMM)", group="execution")
    fuse_combine_norm: bool = option(
        True, "a MoE layer's combine runs inside the next residual add + RMSNorm (one kernel fewer per layer on the "
        "CuTe backend; one process, no overlap; BENCHMARKS.md, Session 17)", group="execution")
    fuse_attention_merge: bool = option(
        True, "decode attention's split-KV partials merged by the last split to finish instead of a combine kernel "
        "(one kernel fewer per layer on the CuTe backend; docs/kernels.md)", group="execution")
    w4a16_decode_kernel: str = option(
        "direct", "the W4A16 experts' kernel for decode steps (a few routed rows per expert): 'direct', warp-level "
        "mma.sync with each warp streaming its own share of K, for each projection whose units fill a wave of its "
        "CTAs (the others keep the wgmma tiles), or 'wgmma', the grouped GEMM's split-K tiles everywhere "
        "(docs/kernels.md, Direct decode kernel)",
        group="execution", choices=W4A16_DECODE_KERNELS)
    w4a16_prefetch_down: bool = option(
        False, "W4A16 decode: the direct up kernel's CTAs that finish a unit early ask L2 for the first part of the "
        "down projection's weights of the active experts, so that the down kernel starts on L2 hits (a hint: no "
        "value changes; opt-in until measured, docs/kernels.md)", group="execution")
    w4a16_fused_decode: bool = option(
        False, "W4A16 decode: the experts' up and down projections in one persistent launch (units taken from a "
        "ticket counter, each down unit after its expert's up units; kernels/w4a16_fused.py; opt-in until measured, "
        "docs/kernels.md)", group="execution")
    skinny_gemm_max_rows: int = option(
        16, f"the most token rows (1..{SKINNY_GEMM_MAX_ROWS}) a step may have for skinny_gemm to take its projections",
        group="execution")
    warmup_graphs: bool = option(
        False, "at start, capture the CUDA graphs first requests would capture (every prefill token bucket, every "
        "decode batch bucket) and compile their kernels, so that no request waits for them (docs/server.md)",
        group="execution")
    async_scheduling: bool = option(
        True, "schedule and launch each step before reading the previous step's tokens back (outputs come one "
        "step later; the same tokens and text)", group="execution")
    async_output_processing: bool = option(
        False, "detokenize and build each step's outputs while the GPUs run the next step (outputs come one "
        "step later; the same tokens and text)", group="execution")
    block_size: int = option(16, "KV cache block size in tokens (a power of two)", group="cache")
    gpu_memory_utilization: float = option(
        0.9, "fraction of the GPU's memory the engine may use; the KV cache gets what the weights and the "
        "activation peak leave", group="cache")
    kv_cache_memory_bytes: int | None = option(
        None, "KV cache size in bytes (instead of --gpu-memory-utilization; the CPU default is 256 MiB)",
        group="cache")
    num_kv_blocks: int | None = option(None, "KV cache size in blocks (overrides the byte budgets)", group="cache",
                                       config_name="num_blocks")
    enable_prefix_caching: bool = option(
        True, "requests share the KV blocks of equal prompt prefixes (one process only; docs/server.md)",
        group="cache", flags=("--enable-prefix-caching", "--prefix-caching"))
    max_num_seqs: int = option(256, "most requests in one batch", group="scheduler")
    max_num_batched_tokens: int = option(
        2048, "token budget of one step, shared by prefill chunks and decodes", group="scheduler")
    enable_chunked_prefill: bool = option(
        True, "split long prompts over steps under the token budget", group="scheduler")
    tensor_parallel_size: int = option(
        1, "must be 1: attention runs data-parallel; spread the experts with --expert-parallel-size",
        group="parallel")
    expert_parallel_size: int = option(
        1, "N processes with the experts partitioned: spawned by this process, or, under torchrun, the job's N "
        "ranks (WORLD_SIZE must be N; only rank 0 returns; docs/expert_parallel.md)", group="parallel")
    expert_placement: str = option(
        "contiguous", "which rank holds which experts (load_aware needs --expert-load-file)", group="parallel",
        choices=PLACEMENT_STRATEGIES)
    expert_load_file: str | None = option(
        None, "recorded per-layer expert load (ExpertLoadWindow.save) for load_aware placement", group="parallel")
    collective_timeout_s: float = option(
        300.0, "seconds any collective may take before a dead rank is reported", group="parallel")
    enable_overlap: bool = option(
        False, "two micro-batches per MoE layer: one's exchange runs while the other computes "
        "(parallel/overlap.py)", group="parallel")
    num_redundant_experts: int = option(
        0, "extra expert slots per rank for copies of hot experts (load_aware placement, rebalancing)",
        group="parallel")
    expert_load_window: int = option(1024, "steps of expert-load statistics kept for rebalancing",
                                     group="parallel")
    rebalance_interval: int = option(
        0, "rebalance every that many steps when the load is uneven (0: only engine.rebalance())",
        group="parallel")
    rebalance_threshold: float = option(
        1.2, "max/mean tokens per rank above which a due rebalance runs (>= 1)", group="parallel")
    fixed_capacity_tokens: int = option(
        256, "expert parallelism: decode steps exchange this many padded rows per rank pair with no host sync, "
        "which also lets them run as CUDA graphs (0: always variable splits)", group="parallel")
    ep_exchange: str = option(
        "nccl", "how that fixed-capacity exchange moves: NCCL all-to-all, or p2p: writes into the peer GPUs' "
        "memory over NVLink (symmetric memory; one host; experimental)", group="parallel", choices=EP_EXCHANGES)
    quantization: str | W4A16Config | None = option(
        None, "quantize the routed experts on load (int4 RTN; GPTQ / AWQ checkpoints are detected without it; "
        "docs/quantization.md)", group="quantization", choices=QUANTIZATION_METHODS)
    quant_group_size: int = option(128, "W4A16 group size along the input dimension", group="quantization",
                                   choices=SUPPORTED_GROUP_SIZES, flags=("--quant-group-size", "--group-size"))
    quant_symmetric: bool = option(
        True, "W4A16 with per-group zero points (default: symmetric, zero point 8)", group="quantization",
        flags=("--quant-asymmetric", "--asymmetric"), negate=True)
    quant_attention: bool = option(
        False, "with --quantization w4a16: quantize the attention projections (qkv, o) as well "
        "(docs/quantization.md)", group="quantization")

    # ---- checks: everything that needs no checkpoint, on construction ------------------------------------
    def __post_init__(self) -> None:
        if not isinstance(self.model, str | Path) or not str(self.model):
            raise ValueError(f"model must be a model directory, got {self.model!r}")
        for f in fields(self):
            value, flag = getattr(self, f.name), f.metadata["flag"]
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be True or False, got {value!r}")
            if flag.choices is not None and isinstance(value, str | int) and value not in flag.choices:
                raise ValueError(f"{f.name} must be one of {flag.choices}, got {value!r}")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.device != "auto":
            try:
                device_type = torch.device(self.device).type
            except (RuntimeError, TypeError):
                device_type = None
            if device_type not in ("cpu", "cuda"):
                raise ValueError(f"device must be 'auto', 'cpu' or 'cuda' (e.g. 'cuda:1'), got {self.device!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len <= 0):
            raise ValueError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.skinny_gemm_max_rows, int) or not 1 <= self.skinny_gemm_max_rows <= SKINNY_GEMM_MAX_ROWS:
            raise ValueError(f"skinny_gemm_max_rows must be an integer in [1, {SKINNY_GEMM_MAX_ROWS}], got "
                             f"{self.skinny_gemm_max_rows!r}")
        self.parallel_config()
        self.cache_config()
        self.scheduler_config()
        if self.quant_scheme() is not None and self.expert_parallel_size > 1:
            raise ValueError("quantization (W4A16 experts) is not supported with expert_parallel_size > 1 yet")

    # ---- the configs ---------------------------------------------------------------------------------------
    def parallel_config(self) -> ParallelConfig:
        return self._fill(ParallelConfig)

    def cache_config(self) -> CacheConfig:
        # prefix caching is one process only (engine/kv_cache.PREFIX_CACHING_EP_REASON)
        return self._fill(CacheConfig, enable_prefix_caching=self.enable_prefix_caching
                          and self.expert_parallel_size == 1)

    def scheduler_config(self) -> SchedulerConfig:
        return self._fill(SchedulerConfig)

    def quant_scheme(self) -> W4A16Config | None:
        return parse_quantization(self.quantization, self.quant_group_size, self.quant_symmetric,
                                  self.quant_attention)

    def create_engine_config(self, model_cfg: ModelConfig, device: torch.device) -> EngineConfig:
        """The engine's config for this checkpoint (config.json read, no weights) on `device` (resolved:
        engine/devices.resolve_device): the dtype resolved, the context window checked against the model's."""
        limit = model_cfg.max_position_embeddings
        if model_cfg.sliding_window is not None and model_cfg.sliding_window < limit:
            logger.info("capping the context at the sliding window (%d): windowed attention is not implemented",
                        model_cfg.sliding_window)
            limit = model_cfg.sliding_window
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's context window {limit}")
        return self._fill(EngineConfig, model_path=str(self.model),
                          dtype=resolve_dtype(self.dtype, model_cfg.torch_dtype, device), device=device,
                          max_model_len=self.max_model_len or limit, cache=self.cache_config(),
                          parallel=self.parallel_config(), scheduler=self.scheduler_config(),
                          enable_cuda_graphs=not self.enforce_eager, quantization=self.quant_scheme())

    def _fill(self, config_cls, **derived):
        """config_cls with every field from the option of that name (or config_name), or from `derived`. A config
        field no option fills is an error: it would silently keep its default."""
        by_name = {f.metadata["flag"].config_name or f.name: f.name for f in fields(self)}
        values = {}
        for f in fields(config_cls):
            if not f.init:
                continue
            if f.name in derived:
                values[f.name] = derived[f.name]
            elif f.name in by_name:
                values[f.name] = getattr(self, by_name[f.name])
            else:
                raise TypeError(f"{config_cls.__name__}.{f.name} has no EngineArgs option: add one "
                                "(light_moe/engine/args.py) or derive it in EngineArgs")
        return config_cls(**values)

    # ---- the command line ------------------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, *, only: tuple[str, ...] | None = None,
                     exclude: tuple[str, ...] = (), defaults: dict | None = None,
                     aliases: dict | None = None) -> argparse.ArgumentParser:
        """One flag per option (or per option of `only`), in argument groups "engine: <group>", except `exclude`
        (options the command decides itself). defaults: the command's own defaults (a default for `model` makes
        --model optional); aliases: more flags of an option. from_cli_args reads back the options added here."""
        defaults, aliases = dict(defaults or {}), dict(aliases or {})
        known = {f.name for f in fields(cls)}
        unknown = [n for n in (*(only or ()), *exclude, *defaults, *aliases) if n not in known]
        if unknown:
            raise ValueError(f"not EngineArgs options: {unknown}")
        hints = get_type_hints(cls)
        groups: dict[str, argparse._ArgumentGroup] = {}
        added = []
        for f in fields(cls):
            if f.name in exclude or (only is not None and f.name not in only):
                continue
            flag = f.metadata["flag"]
            if flag.group not in groups:
                groups[flag.group] = parser.add_argument_group(f"engine: {flag.group}")
            default = defaults.get(f.name, f.default)
            option_strings = (*_flags(f), *aliases.get(f.name, ()))
            kwargs: dict[str, Any] = dict(dest=f.name, default=default, help=flag.help)
            if hints[f.name] is bool:
                kwargs["action"] = ("store_false" if flag.negate else
                                    argparse.BooleanOptionalAction if default else "store_true")
                if kwargs["action"] is argparse.BooleanOptionalAction:
                    kwargs["help"] += " (default: on)"
            else:
                kwargs.update(type=_cli_type(hints[f.name]), choices=flag.choices, required=default is MISSING)
                if default is MISSING:
                    del kwargs["default"]
                elif default is not None:
                    kwargs["help"] += " (default: %(default)s)"
            groups[flag.group].add_argument(*option_strings, **kwargs)
            added.append(f.name)
        parser.set_defaults(engine_options=tuple(added))
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides) -> EngineArgs:
        """EngineArgs from parsed flags (those add_cli_args added), with `overrides` (what the command decides).
        A bad value is a ValueError naming its flag."""
        names = getattr(args, "engine_options", None)
        if names is None:  # a namespace made by hand: every option it has
            names = [f.name for f in fields(cls) if hasattr(args, f.name)]
        values = {name: getattr(args, name) for name in names}
        values.update(overrides)
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(cls._name_the_flag(str(exc))) from None

    @classmethod
    def _name_the_flag(cls, message: str) -> str:
        """'argument --flag: message' for the first option the message names (by its name or its config name)."""
        flags = {}
        for f in fields(cls):
            flags[f.name] = _flags(f)[0]
            if f.metadata["flag"].config_name:
                flags[f.metadata["flag"].config_name] = _flags(f)[0]
        found = re.search(r"(?<![\w-])(" + "|".join(sorted(flags, key=len, reverse=True)) + r")(?![\w-])", message)
        return message if found is None else f"argument {flags[found.group(1)]}: {message}"

    def to_cli_args(self, defaults: dict | None = None) -> list[str]:
        """The flags that give these options (those away from their defaults, and --model), for a subprocess:
        `light-moe serve` started by `light-moe bench serve`. defaults: the receiving command's own defaults
        (add_cli_args' defaults; SERVER_DEFAULTS for `light-moe serve`)."""
        defaults = defaults or {}
        out = ["--model", str(self.model)]
        for f in fields(self)[1:]:
            value, flag = getattr(self, f.name), f.metadata["flag"]
            if value == defaults.get(f.name, f.default):
                continue
            name = _flags(f)[0]
            if isinstance(value, bool):
                out.append(name if flag.negate or value else f"--no-{name[2:]}")
            elif value is None or isinstance(value, W4A16Config):
                raise ValueError(f"{f.name}={value!r} has no command-line form")
            else:
                out += [name, str(value).removeprefix("torch.")]
        return out

    def replace(self, **changes) -> EngineArgs:
        """A copy with `changes`, checked again."""
        return dataclasses.replace(self, **changes)


# `light-moe serve`'s own defaults (and `bench serve`'s, which starts it): a server captures its CUDA graphs at
# start, as the peers' servers do, so that no early request waits for a capture (BENCHMARKS.md, serving)
SERVER_DEFAULTS: dict[str, Any] = {"warmup_graphs": True}


def _flags(f: dataclasses.Field) -> tuple[str, ...]:
    return f.metadata["flag"].flags or (f"--{f.name.replace('_', '-')}",)


def _cli_type(hint) -> type:
    """int, float or str: the first of them in an option's type (`int | None` -> int; `str | torch.dtype` -> str)."""
    members = getattr(hint, "__args__", (hint,))
    return next(t for t in (int, float, str) if t in members)


def options_signature(function) -> inspect.Signature:
    """function's signature with its **options spelled out as EngineArgs' keyword-only options (defaults, types),
    for help() and editors that read __signature__ (LightMoEEngine.__init__)."""
    sig = inspect.signature(function)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    hints = get_type_hints(EngineArgs)
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
               for f in fields(EngineArgs) if f.default is not MISSING]
    return sig.replace(parameters=params)
