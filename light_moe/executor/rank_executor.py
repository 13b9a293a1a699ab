"""One expert-parallel rank's share of the work (executor/workers.py runs the processes around it).

WorkerSpec: what a rank needs to build its model share and KV cache; the messages rank 0 broadcasts
(StepPlan | WorkerSpec | RankCall | None); RankExecutor: the model share, the KV cache, the
dispatchers (all-to-all or peer exchange, optionally two-batch overlap) and the load statistics of
one rank, running its part of each step plan. The same class runs on rank 0 (inside the engine's
process) and on ranks 1..N-1 (inside follow_rank0).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from light_moe.config import CacheConfig, EngineConfig
from light_moe.executor.batch import ScheduledRequest
from light_moe.executor.model_runner import ModelRunner
from light_moe.executor.step_plan import PlannedSequence, StepPlan
from light_moe.models.loader import build_model, load_model_config
from light_moe.ops.backend import MoEOps
from light_moe.ops.select import select_backend
from light_moe.parallel.balancer import ExpertLoadTracker, apply_placements, reduce_load
from light_moe.parallel.dispatch import AllToAllDispatcher, make_dispatchers
from light_moe.parallel.groups import ExpertParallelGroup, broadcast_pickled
from light_moe.parallel.overlap import TwoBatchOverlap
from light_moe.parallel.p2p_exchange import PeerExchange
from light_moe.parallel.placement import ExpertPlacement
from light_moe.runtime.device_to_host import HostCopy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to build its share of the model (pickled to spawned workers): the engine's config
    whole (engine/args.EngineArgs fills it, so every engine option reaches the ranks; device cpu, or cuda: rank r
    uses cuda:r) and the expert placement of each MoE layer."""

    config: EngineConfig
    placements: tuple[ExpertPlacement, ...]  # one per MoE layer

    @property
    def world_size(self) -> int:
        return self.placements[0].world_size

    def with_model_path(self, model_path: str) -> WorkerSpec:
        return dataclasses.replace(self, config=dataclasses.replace(self.config, model_path=model_path))


@dataclass(frozen=True)
class RankCall:
    """Run fn(rank_executor, *args) on every rank, between steps (benchmarks and tests: e.g. skew the
    routers of a random model). fn must be picklable (a module-level function); its result on rank 0
    is returned, the others' are dropped."""

    fn: object
    args: tuple = ()


class _PlannedRequest(NamedTuple):
    """What ModelRunner.prepare reads from a Request; a plan carries only this step's chunk of tokens,
    never the whole context."""

    num_computed_tokens: int
    planned_tokens: list[int]
    block_table: list[int]

    def tokens(self, start: int, end: int) -> list[int]:
        if start != self.num_computed_tokens or end != start + len(self.planned_tokens):
            raise IndexError(f"plan carries tokens [{self.num_computed_tokens}, "
                             f"{self.num_computed_tokens + len(self.planned_tokens)}), asked for [{start}, {end})")
        return self.planned_tokens


def _scheduled(seq: PlannedSequence) -> ScheduledRequest:
    request = _PlannedRequest(seq.start, seq.tokens, seq.block_table)
    return ScheduledRequest(request, len(seq.tokens), seq.is_prefill, seq.samples)  # type: ignore[arg-type]


Message = StepPlan | WorkerSpec | RankCall | None  # run a step | (re)build the model | call | shut down


def broadcast_message(message: Message, group: ExpertParallelGroup) -> Message:
    """Rank 0 sends, the others receive (the argument of a receiver is ignored)."""
    return broadcast_pickled(message, group.rank, group.cpu_group)


def free_device_memory() -> None:
    """Return a dropped RankExecutor's memory (model, KV cache) to the device now. Its decode graphs' warm-up
    hook refers back to it (a reference cycle), so without a collection the old model and cache stay alive
    until some later gc pass: the next model's memory profile then ran out of memory (seen on 2 H100s)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class RankExecutor:
    """One rank's model share and KV cache; runs its part of each plan."""

    def __init__(self, spec: WorkerSpec, group: ExpertParallelGroup, ops: MoEOps | None = None):
        self.group = group
        device, cfg = group.device, spec.config
        if ops is None:
            ops, reason = select_backend(cfg.moe_backend, device, cfg.skinny_gemm, cfg.skinny_gemm_max_rows,
                                         cfg.fuse_combine_norm, fuse_attention_merge=cfg.fuse_attention_merge,
                                         w4a16_decode_kernel=cfg.w4a16_decode_kernel,
                                         w4a16_prefetch_down=cfg.w4a16_prefetch_down,
                                         w4a16_fused_decode=cfg.w4a16_fused_decode)
            logger.info("rank %d MoE backend: %s", group.rank, reason)
        self.peer_exchange = self._peer_exchange(spec)
        self.dispatchers = make_dispatchers(list(spec.placements), group.rank, group.device_group, ops, device,
                                            peer=self.peer_exchange)
        self.model = build_model(cfg.model_path, ops, cfg.dtype, device, cfg.load_format, cfg.seed,
                                 progress=False, expert_dispatchers=self.dispatchers)
        if cfg.parallel.enable_overlap:
            for block, dispatcher in zip(self.model.moe_blocks(), self.dispatchers):
                block.overlap = TwoBatchOverlap(dispatcher)
        self._empty_batch = torch.empty(0, self.model.config.hidden_size, dtype=cfg.dtype, device=group.device)
        self.tracker = ExpertLoadTracker()
        self.last_load: HostCopy | None = None  # rank 0: [L, E + N] from the last collect_load step
        self.runner = self._runner(cfg, cfg.cache)
        self._agree_on_kv_blocks(spec)

    def _peer_exchange(self, spec: WorkerSpec) -> PeerExchange | None:
        """ep_exchange="p2p": this rank's symmetric-memory inboxes, shared by every MoE layer, sized for the largest
        fixed-capacity step (fixed_capacity_tokens packed rows per rank pair). A collective: every rank builds its
        executor from the same spec at the same time."""
        cfg = spec.config
        if cfg.parallel.ep_exchange != "p2p":
            return None
        hidden = load_model_config(cfg.model_path)[1].hidden_size
        row_bytes = AllToAllDispatcher.packed_layout(hidden, cfg.dtype.itemsize)[1]
        return PeerExchange.symmetric(self.group.device_group, self.group.device, cfg.parallel.fixed_capacity_tokens,
                                      row_bytes)

    def _runner(self, cfg: EngineConfig, cache: CacheConfig) -> ModelRunner:
        # CUDA graphs only where the exchange is the fixed-capacity one (decode-sized steps): the variable
        # exchange reads its split sizes on the host
        graphs = cfg.enable_cuda_graphs and cfg.parallel.fixed_capacity_tokens > 0
        return ModelRunner(self.model, cache, cfg.dtype, self.group.device, cfg.scheduler.max_num_batched_tokens,
                           cfg.scheduler.max_num_seqs, max_model_len=cfg.max_model_len, cuda_graphs=graphs,
                           graph_warmup=self._dry_exchange)

    @contextlib.contextmanager
    def _dry_exchange(self):
        """Warm-up before a graph capture: the MoE layers exchange nothing (see DecodeGraphs)."""
        for dispatcher in self.dispatchers:
            dispatcher.dry_run = True
        try:
            yield
        finally:
            for dispatcher in self.dispatchers:
                dispatcher.dry_run = False

    def _agree_on_kv_blocks(self, spec: WorkerSpec) -> None:
        """Block ids come from rank 0's pool, so every rank needs at least that many blocks: all take
        the smallest count any rank could afford (they differ only when GPUs have different free memory).
        A rank with more rebuilds its runner with the agreed count (no profiling, so no collectives)."""
        count = torch.tensor([self.runner.num_blocks], dtype=torch.long)
        dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.group.cpu_group)
        fewest = int(count.item())
        if fewest < self.runner.num_blocks:
            self.runner = None
            if self.group.device.type == "cuda":
                torch.cuda.empty_cache()
            self.runner = self._runner(spec.config, dataclasses.replace(spec.config.cache, num_blocks=fewest))

    def release_graphs(self) -> None:
        """Drop the captured graphs: before this rank leaves the process group (captured collectives must go
        first), rebuilds its model, or moves expert weights (graphs point at the old ones)."""
        if self.runner is not None and self.runner.decode_graphs is not None:
            self.runner.decode_graphs.release()

    @torch.inference_mode()
    def _idle_forward(self, capacity: int) -> None:
        """No sequences here this step: still serve every MoE layer's exchange, in layer order. Fixed-capacity
        steps replay a graph (per capacity) when decode graphs are on: busy ranks replay theirs, and an eager
        idle rank (tens of launches per layer) would hold every exchange back."""
        graphs = self.runner.decode_graphs
        if graphs is not None and capacity > 0:
            graphs.replay(("idle", capacity), self._serve_exchanges)
        else:
            self._serve_exchanges()

    def _serve_exchanges(self) -> None:
        empty = self._empty_batch  # [0, H], kept: a captured graph may refer to it
        for block in self.model.moe_blocks():
            block(empty)

    def run(self, plan: StepPlan, prev_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Rank 0 gets float32 logits [S, V] of the plan's sampling rows in plan order; others None.
        prev_tokens (rank 0): the previous step's sampled tokens, broadcast to every rank when the plan has
        placeholder inputs (plan.prev_samples > 0)."""
        if plan.placements is not None:
            # captured graphs point at the old expert weights and routing tables: drop them first (they are
            # captured again, lazily, from the new ones)
            self.release_graphs()
            apply_placements(self.model.moe_blocks(), self.dispatchers, list(plan.placements), self.group.rank,
                             self.group.device_group)
            for dispatcher in self.dispatchers:  # rows per rank are measured per placement
                dispatcher.rows_received.zero_()
        for dispatcher in self.dispatchers:  # the same mode on every rank: it rides in the plan
            dispatcher.capacity = plan.exchange_capacity
        if plan.prev_samples:  # every rank joins, idle ones too
            if self.group.rank != 0:
                prev_tokens = torch.empty(plan.prev_samples, dtype=torch.long, device=self.group.device)
            dist.broadcast(prev_tokens, src=0, group=self.group.device_group)
        mine = [_scheduled(s) for s in plan.sequences if s.owner == self.group.rank]
        if mine:  # decode graphs only on fixed-capacity steps; one graph per capacity
            logits = self.runner.execute(mine, graph_tag=plan.exchange_capacity,
                                         allow_graph=plan.exchange_capacity > 0,
                                         prev_tokens=prev_tokens)  # [S_rank, V]
        else:
            self._idle_forward(plan.exchange_capacity)
            logits = torch.empty(0, self.model.config.vocab_size, dtype=torch.float32, device=self.group.device)
        gathered = self._gather_logits(plan, logits)
        self.tracker.add([b.last_tokens_per_expert for b in self.model.moe_blocks()])
        if plan.collect_load:
            self.last_load = reduce_load(self.tracker, self.dispatchers, self.model.config.num_experts,
                                         self.group.rank, self.group.device_group, self.group.device)
        return gathered

    def _gather_logits(self, plan: StepPlan, logits: torch.Tensor) -> torch.Tensor | None:
        world = self.group.world_size
        counts = [0] * world
        for s in plan.sequences:
            counts[s.owner] += s.samples
        most = max(counts)
        if most == 0:
            return logits if self.group.rank == 0 else None
        padded = logits.new_zeros(most, logits.shape[1])  # gather needs equal shapes
        padded[: logits.shape[0]] = logits
        parts = [torch.empty_like(padded) for _ in range(world)] if self.group.rank == 0 else None
        dist.gather(padded, parts, dst=0, group=self.group.device_group)
        if self.group.rank != 0:
            return None
        taken = [0] * world
        rows = []
        for s in plan.sequences:
            if s.samples:
                rows.append(parts[s.owner][taken[s.owner]])
                taken[s.owner] += 1
        return torch.stack(rows)
