"""LightMoEEngine: requests in, text out, one scheduler step at a time.

    add_request -> step() [schedule -> run model -> sample -> stop checks -> detokenize] -> RequestOutput
generate / stream / chat are loops over step() (engine/generate.py); expert-load statistics and
rebalancing are in engine/expert_load.py. The API server drives add_request / step / abort directly
from its own loop and reads the engine's state through queue_stats() and get_request(). The scheduler
(CPU only) decides what runs; the model runner owns all tensors.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import torch

from light_moe.engine.args import EngineArgs, options_signature
from light_moe.engine.devices import check_ep_exchange, resolve_device
from light_moe.engine.expert_load import ExpertLoadBalancing
from light_moe.engine.generate import GenerateLoops, Prompt
from light_moe.engine.inflight import InflightStep
from light_moe.engine.kv_cache import PREFIX_CACHING_EP_REASON, BlockManager, PartitionedBlockManager
from light_moe.engine.outputs import RequestOutput
from light_moe.engine.request import Request
from light_moe.engine.request_state import FailedRequestOutput, RequestState
from light_moe.engine.sampler import rows_failing_alone, sample_on_device
from light_moe.engine.scheduler import Scheduler
from light_moe.engine.tokenizer import Tokenizer
from light_moe.executor.model_runner import ModelRunner
from light_moe.executor.pending_tokens import placeholder
from light_moe.executor.workers import ExpertParallelExecutor, WorkerSpec, torchrun_worker
from light_moe.models.loader import build_model, load_model_config
from light_moe.ops.select import select_backend
from light_moe.parallel.groups import torchrun_launch
from light_moe.parallel.placement import place_experts, read_expert_load
from light_moe.quant.checkpoint import read_checkpoint_quantization
from light_moe.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

class LightMoEEngine(GenerateLoops, ExpertLoadBalancing):
    """Offline and online inference for MoE checkpoints in Hugging Face format.

    expert_parallel_size=N > 1 spawns ranks 1..N-1, or, in a job started by torchrun (WORLD_SIZE must be
    N), the constructor returns on rank 0 only: on the other ranks it serves rank 0 until it shuts down,
    then raises SystemExit(0) (docs/expert_parallel.md, "Launching with torchrun")."""

    # False: step() returns TokenDeltas (new token ids, no text; stop strings are not looked for) instead of
    # RequestOutputs, for the API server's engine-core process, whose API process detokenizes
    # (server/engine_core.py). Set before the first add_request.
    detokenize = True

    def __init__(self, model_path: str | Path | EngineArgs, *,
                 expert_parallel_executor: ExpertParallelExecutor | None = None, **options):
        """model_path: a Hugging Face model directory, with `options`: the keyword arguments of EngineArgs
        (engine/args.py: each option's default and help; `help(LightMoEEngine)` lists them), all checked before
        anything is read; or an EngineArgs, alone. expert_parallel_executor: expert-parallel worker processes to
        use (benchmarks reuse them across engines); shutdown() leaves them running."""
        if isinstance(model_path, EngineArgs):
            if options:
                raise TypeError(f"options {sorted(options)} given with an EngineArgs: put them in it")
            args = model_path
        else:
            args = EngineArgs(model_path, **options)
        self.args = args
        parallel = args.parallel_config()
        # launched by torchrun: every rank constructs the engine; rank 0 is the engine, the others become
        # workers below (this constructor never returns on them)
        launch = torchrun_launch() if expert_parallel_executor is None else None
        if launch is not None and launch.world_size > 1 and launch.world_size != parallel.expert_parallel_size:
            raise ValueError(f"launched by torchrun with WORLD_SIZE={launch.world_size} but expert_parallel_size="
                             f"{parallel.expert_parallel_size}: every rank of the job is one expert-parallel rank, "
                             "so they must be equal (torchrun --nproc-per-node x --nnodes = expert_parallel_size)")
        if launch is not None and launch.world_size == 1:
            launch = None  # a one-process job: the engine runs as if torchrun had not started it
        model_path = Path(args.model)
        _, model_cfg = load_model_config(model_path)
        checkpoint_quant = None if args.load_format == "dummy" else read_checkpoint_quantization(model_path)
        if checkpoint_quant is not None and parallel.expert_parallel_size > 1:
            raise ValueError("W4A16 experts (a GPTQ / AWQ checkpoint) are not supported with expert_parallel_size > 1 "
                             "yet")
        dev = resolve_device(args.device)
        check_ep_exchange(parallel, dev, launch)  # before any process is spawned
        self.config = args.create_engine_config(model_cfg, dev)
        if launch is not None and launch.is_worker:
            # ranks 1..N-1 of a torchrun job: serve rank 0's steps until it shuts down, then end the process
            # ("only rank 0 returns"); an error (rank 0 died, a collective timed out) propagates: exit code 1
            torchrun_worker(launch, dev, parallel.collective_timeout_s, str(model_path))
            raise SystemExit(0)
        self.tokenizer = Tokenizer(model_path)
        self.model_config = model_cfg
        self.ops, reason = select_backend(args.moe_backend, dev, args.skinny_gemm, args.skinny_gemm_max_rows,
                                             args.fuse_combine_norm, fuse_attention_merge=args.fuse_attention_merge,
                                             w4a16_decode_kernel=args.w4a16_decode_kernel,
                                             w4a16_prefetch_down=args.w4a16_prefetch_down,
                                             w4a16_fused_decode=args.w4a16_fused_decode)
        logger.info("MoE backend: %s", reason)
        self.moe_backend_reason = reason
        # expert parallelism: this process is rank 0; the executor's worker processes (spawned, or started by
        # torchrun) are ranks 1..N-1.
        # A caller-made executor (reused across engines) is left running by shutdown().
        if expert_parallel_executor is not None and parallel.expert_parallel_size == 1:
            raise ValueError("expert_parallel_executor was given but expert_parallel_size is 1")
        self._shut_down = False
        self.workers: ExpertParallelExecutor | None = expert_parallel_executor
        self._owns_workers = False
        cfg = self.config
        if parallel.expert_parallel_size > 1:
            spec = self._worker_spec()  # validates the placement first
            if self.workers is None:
                self.workers = ExpertParallelExecutor(parallel.expert_parallel_size, dev, parallel.collective_timeout_s,
                                                      torchrun=launch)
                self._owns_workers = True
            try:
                self.model, self.runner = self.workers.load(spec, self.ops)
            except BaseException:
                self.shutdown()
                raise
        else:
            self.model = build_model(model_path, self.ops, cfg.dtype, dev, cfg.load_format, cfg.seed,
                                     progress=args.show_progress, quantization=cfg.quantization)
            self.runner = ModelRunner(self.model, cfg.cache, cfg.dtype, dev, cfg.scheduler.max_num_batched_tokens,
                                      cfg.scheduler.max_num_seqs, max_model_len=cfg.max_model_len,
                                      cuda_graphs=cfg.enable_cuda_graphs, prefill_graphs=cfg.enable_cuda_graphs)
        self._init_expert_load(len(self.model_config.moe_layers), model_cfg.num_experts, parallel)
        if cfg.warmup_graphs:
            self._warm_up()
        if self.workers is None:
            self.block_manager = BlockManager(self.runner.num_blocks, cfg.cache.block_size,
                                              enable_prefix_caching=cfg.cache.enable_prefix_caching)
        else:  # one partition per rank: each rank's KV cache holds only its own sequences' blocks
            if args.enable_prefix_caching:
                logger.info(PREFIX_CACHING_EP_REASON)
            self.block_manager = PartitionedBlockManager(self.runner.num_blocks, cfg.cache.block_size,
                                                         parallel.expert_parallel_size)
        self.scheduler = Scheduler(cfg.scheduler, self.block_manager)
        self.eos_token_ids = self._eos_ids(model_path)
        self._states: dict[str, RequestState] = {}
        # async_output_processing: (state, finish reason, time) of the last step's tokens, emitted by the next step
        self._pending: list[tuple[RequestState, str | None, float]] = []
        self._inflight: InflightStep | None = None  # async_scheduling: the launched step not yet read back
        self._ids = itertools.count()
        self._generator = torch.Generator(device=dev).manual_seed(cfg.seed)
        self.stats = {
            "steps": 0,
            "prompt_tokens": 0,
            "generation_tokens": 0,
            "last_batch_size": 0,
            "max_batch_size": 0,
            "preemptions": 0,
            "rebalances": 0,
            "steps_ahead": 0,  # async_scheduling: steps launched before the previous one was read back
        }

    @classmethod
    def from_engine_args(cls, args: EngineArgs, *,
                         expert_parallel_executor: ExpertParallelExecutor | None = None) -> LightMoEEngine:
        return cls(args, expert_parallel_executor=expert_parallel_executor)

    # ---- set-up helpers -----------------------------------------------------------------------
    def _worker_spec(self) -> WorkerSpec:
        """The engine's config and each MoE layer's expert placement, for every rank."""
        parallel = self.config.parallel
        load = read_expert_load(parallel.expert_load_file) if parallel.expert_load_file else None
        placements = place_experts(parallel.expert_placement, self.model_config.num_experts,
                                   len(self.model_config.moe_layers), parallel.expert_parallel_size, load,
                                   parallel.num_redundant_experts)
        return WorkerSpec(self.config, tuple(placements))

    def shutdown(self) -> None:
        """Free this engine's device memory (CUDA graphs, KV cache) and stop the expert-parallel worker
        processes it started. The engine is unusable afterwards. Idempotent."""
        self._shut_down = True
        workers = getattr(self, "workers", None)
        failed = workers is not None and workers.failed  # a broken group may never drain: no device sync then
        if getattr(self, "_owns_workers", False):
            workers.shutdown()  # releases the ranks' graphs before leaving the NCCL group
        runner = getattr(self, "runner", None)
        if runner is not None and not failed:
            runner.release()

    def __del__(self):
        try:  # only the processes: no device work during interpreter teardown
            if getattr(self, "_owns_workers", False):
                self.workers.shutdown()
        except Exception:  # interpreter teardown: multiprocessing ends daemonic workers anyway
            pass

    def _warm_up(self) -> None:
        """EngineConfig.warmup_graphs: the runner's graphs captured (and kernels compiled) now, not by the first
        requests."""
        if self.workers is not None:
            logger.info("warmup: not under expert parallelism yet (the ranks capture their graphs on first use)")
            return
        start = time.perf_counter()
        prefill, decode = self.runner.warm_up()
        logger.info("warmup: captured %d prefill buckets and %d decode graphs in %.1f s", prefill, decode,
                    time.perf_counter() - start)

    def _eos_ids(self, model_path: Path) -> frozenset[int]:
        # config.json's and generation_config.json's, read and validated before the weights load
        # (models/loader.load_model_config)
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(i for i in ids if 0 <= i < self.model_config.vocab_size)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def model_name(self) -> str:
        return Path(self.config.model_path).name

    # ---- requests -----------------------------------------------------------------------------
    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, list | tuple) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids, text = list(prompt), None
        else:
            raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty (no tokens)")
        bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.model_config.vocab_size})"
            )
        return text, ids

    def validate(self, prompt: Prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        text, ids = self._tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context window is {self.max_model_len}")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"window of {self.max_model_len} tokens"
            )
        return text, ids

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        self._check_open()
        params = params or SamplingParams()
        text, ids = self.validate(prompt, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._states:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(request_id=request_id, prompt_token_ids=ids, sampling_params=params, prompt=text)
        self.scheduler.add_request(request)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.config.device).manual_seed(params.seed)
        self._states[request_id] = RequestState(request, self.tokenizer, generator, self.eos_token_ids,
                                                   self.detokenize)
        self.stats["prompt_tokens"] += len(ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks. Unknown or finished ids return False."""
        state = self._states.pop(request_id, None)
        self._pending = [p for p in self._pending if p[0].request.request_id != request_id]  # nothing more for it
        found = self.scheduler.abort_request(request_id)
        return found or state is not None

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache's blocks (as vLLM's LLM.reset_prefix_cache: after changing what the model
        computes, or to time prefills without hits). Only with no request unfinished: False otherwise."""
        if self.has_unfinished_requests():
            return False
        return self.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        """Requests still running or waiting, or outputs not yet returned by step()."""
        return self.scheduler.has_unfinished_requests() or bool(self._pending) or self._inflight_is_live()

    def queue_stats(self) -> dict:
        """Scheduler and KV-cache state for monitoring (the API server's metrics): running and waiting
        requests, the KV cache's used fraction and the prefix cache's query / hit token counts."""
        bm = self.block_manager
        return {"num_running": self.scheduler.num_running, "num_waiting": self.scheduler.num_waiting,
                "kv_usage": bm.usage, "prefix_cache_queries": bm.prefix_cache_queries,
                "prefix_cache_hits": bm.prefix_cache_hits}

    def get_request(self, request_id: str) -> Request | None:
        """The scheduler's record of a request still running or waiting (None once it finished)."""
        return self.scheduler.get_request(request_id)

    def _inflight_is_live(self) -> bool:
        """Whether the step in flight has a request its read-back would still give an output (not all aborted)."""
        return self._inflight is not None and any(
            (st := self._states.get(s.request.request_id)) is not None and st.request is s.request
            for s in self._inflight.sampling)

    # ---- the step -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._shut_down:
            raise RuntimeError("this engine was shut down (its KV cache and CUDA graphs are freed); create a new one")

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the RequestOutputs it produced. With async_output_processing or
        async_scheduling, the tokens of a step come out of the next call.

        One path for every mode: the step is launched, its sampled tokens are queued on the device
        (sample_on_device) as an InflightStep, and the requests get placeholder tokens; reading the tokens
        back (_read_back: endings, text, outputs) happens at once, or, with async_scheduling, in the next
        call after that call's step is launched. Its decode rows then take the placeholders as inputs, which
        the device fills from these tokens (executor/pending_tokens.py). A request that ends with step n's
        token (stop token or string) was scheduled into step n + 1 too: that row is wasted and its token
        dropped; max_tokens endings are known ahead and never waste one. Requests with a repetition penalty
        need every token on the host to sample, so while one runs, each step reads the last one back first.
        async_output_processing (without async_scheduling) defers the text and outputs of a step to the next
        call, after its kernels are launched."""
        self._check_open()
        outputs = []
        if self._inflight is not None and any(st.params.repetition_penalty != 1.0 for st in self._states.values()):
            outputs += self._read_back()
        out = self.scheduler.schedule()
        if out.finished or not out.scheduled:  # a final output must follow the pending one of its request
            outputs += self._flush()
        for request in out.finished:  # the scheduler ended it (grew past the whole cache): "capacity"
            state = self._states.pop(request.request_id, None)
            if state is not None:
                outputs.append(self._guarded(state, state.final_output, request.finish_reason or "capacity"))
        self.stats["preemptions"] += len(out.preempted)
        if not out.scheduled:
            return outputs
        prev = None if self._inflight is None else self._inflight.tokens
        self.stats["steps_ahead"] += prev is not None
        executor = self.runner if self.workers is None else self.workers
        logits = executor.execute(out.scheduled, prev_tokens=prev)  # [S, V]; on a GPU still being computed
        sampling = [s for s in out.scheduled if s.samples]
        launched = None
        if sampling:
            sampling, launched = self._sample(sampling, logits, outputs)
        outputs += self._flush()  # the last step's host work overlaps this step's kernels
        self.scheduler.update_from_output(out, {s.request.request_id: placeholder(i) for i, s in enumerate(sampling)})
        self._inflight = launched
        if self.config.async_scheduling:
            for s in sampling:  # an ending known ahead: not scheduled again; its last token still reads back
                request = s.request
                if not request.is_finished and request.num_output_tokens >= request.sampling_params.max_tokens:
                    self.scheduler.finish_request(request.request_id, "length")
        else:
            outputs += self._read_back()
        self.stats["steps"] += 1
        self._record_expert_load()
        self.stats["last_batch_size"] = len(out.scheduled)
        self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(out.scheduled))
        return outputs

    def _flush(self) -> list[RequestOutput]:
        """What the last step left for the host: its tokens (async_scheduling), its outputs (async outputs)."""
        return self._read_back() + self._emit_pending()

    def _read_back(self) -> list[RequestOutput]:
        """Read the in-flight step's tokens into their requests: endings, then text and outputs (kept for the
        next call under async_output_processing without async_scheduling, which already lags a call)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return []
        tokens, logprobs = inflight.read()
        defer = self.config.async_output_processing and not self.config.async_scheduling
        now = time.monotonic()
        outputs = []
        for i, s in enumerate(inflight.sampling):
            request = s.request
            state = self._states.get(request.request_id)
            if state is None or state.request is not request:
                continue  # aborted, or ended by the step before (this row was wasted)
            if request.output_token_ids[-1] != placeholder(i):
                raise RuntimeError(f"request {request.request_id!r}: its last token is not the placeholder of "
                                   "the step being read back")
            request.output_token_ids[-1] = tokens[i]
            self.stats["generation_tokens"] += 1
            try:
                finish_reason = state.accept(tokens[i], None if logprobs is None else logprobs[i], now)
            except Exception as exc:
                outputs.append(self._fail_request(state, exc))
                continue
            if finish_reason is not None:  # its blocks are free before the next schedule
                self.scheduler.finish_request(request.request_id, finish_reason)  # no-op after a max_tokens end
                self._states.pop(request.request_id, None)
            if defer:
                self._pending.append((state, finish_reason, now))
            else:
                outputs.append(self._guarded(state, state.emit, finish_reason, now))
        return outputs

    def _emit_pending(self) -> list[RequestOutput]:
        pending, self._pending = self._pending, []
        return [self._guarded(state, state.emit, finish_reason, now) for state, finish_reason, now in pending]

    # ---- one request's failure is that request's alone ---------------------------------------
    def _sample(self, sampling: list, logits: torch.Tensor, outputs: list[RequestOutput]):
        """Launch the draw of the step's tokens -> (the rows kept, their InflightStep). SamplingParams bounds
        every value, so a sampler error is a bug; should one happen, the rows that fail alone fail (outputs
        get their "error" outputs) and the others are drawn; an error no single row causes propagates."""
        rows = [self._states[s.request.request_id].sampling_row() for s in sampling]
        try:
            return sampling, InflightStep.start(sampling, *sample_on_device(logits, rows, self._generator))
        except Exception:
            failures = rows_failing_alone(logits, rows)
            if not failures:
                raise
        outputs += [self._fail_request(self._states[sampling[i].request.request_id], e) for i, e in failures.items()]
        keep = [i for i in range(len(sampling)) if i not in failures]
        if not keep:
            return [], None
        logits = logits.index_select(0, torch.tensor(keep, device=logits.device))
        sampling, rows = [sampling[i] for i in keep], [rows[i] for i in keep]
        return sampling, InflightStep.start(sampling, *sample_on_device(logits, rows, self._generator))

    def _guarded(self, state: RequestState, work, *args) -> RequestOutput:
        """work(*args) -> the request's output; if it raises, the request fails alone."""
        try:
            return work(*args)
        except Exception as exc:
            return self._fail_request(state, exc)

    def _fail_request(self, state: RequestState, exc: BaseException) -> FailedRequestOutput:
        """End a request whose own host work (sampling, text, stop strings) raised: its KV blocks are freed
        and it gets a last output with finish_reason "error"; the engine and the other requests go on."""
        request_id = state.request.request_id
        logger.error("request %s failed: %s: %s", request_id, type(exc).__name__, exc, exc_info=exc)
        self._states.pop(request_id, None)
        self._pending = [p for p in self._pending if p[0] is not state]
        self.scheduler.finish_request(request_id, "error")  # False (nothing to do) if it had finished already
        return state.failed_output(exc)


LightMoEEngine.__init__.__signature__ = options_signature(LightMoEEngine.__init__)  # help() lists every option
