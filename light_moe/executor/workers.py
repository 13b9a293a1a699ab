"""Expert-parallel execution: N ranks, one process each; rank 0 is the engine's own process.

Ranks 1..N-1 are spawned by rank 0 (`worker_main`) or started by torchrun (`torchrun_worker`, from the
engine's constructor on those ranks); both run the same loop, `follow_rank0`.

Per engine step (docs/expert_parallel.md has the full picture):
  rank 0   scheduler -> StepPlan (for every scheduled sequence: its owner rank, the token chunk,
           start position, block table, whether it samples) -> broadcast over the gloo cpu_group
  all      run the plan's sequences they own (attention is data-parallel); a rank that owns
           none still runs every MoE layer on an empty batch, because each MoE layer is a set
           of collectives every rank must join (light_moe/parallel/dispatch.py)
  all      logits of the sampling rows -> gathered to rank 0, which samples: seeded per-request
           generators and the sampler stay on rank 0, so sampling is exactly the 1-process one
Load balancing (parallel/balancer.py): a plan may carry new expert placements, which every rank
applies (moving expert weights) before that step's forward, and a `collect_load` flag, after which
every rank reduces its expert-load statistics to rank 0. Both ride in the plan, so all ranks act at
the same step boundary.
KV cache: rank 0's PartitionedBlockManager (engine/kv_cache.py) has one partition of block ids per
rank, and every rank's cache holds only its partition. A request's blocks all come from one
partition, chosen at its first allocation (fewest live requests), which makes that rank its owner:
plans carry the owner and the block table in the owner's local ids.

Failures: a worker that raises reports its traceback on an error queue and exits 1. Rank 0
checks that workers are alive before each step and turns a failed collective (peer gone, or the
collective timeout passed) into a RuntimeError naming the dead ranks and their errors; the
executor then stays failed (every later step raises at once) until shutdown().
"""
from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import queue
import signal
import sys
import time
import traceback
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from light_moe.executor.batch import ScheduledRequest
from light_moe.executor.model_runner import ModelRunner
from light_moe.executor.pending_tokens import has_pending
from light_moe.executor.rank_executor import (  # WorkerSpec, free_device_memory: re-exported
    RankCall,
    RankExecutor,
    WorkerSpec,
    broadcast_message,
    free_device_memory,
)
from light_moe.executor.step_plan import PlannedSequence, StepPlan, exchange_capacity
from light_moe.models.base import MoECausalLM
from light_moe.ops.backend import MoEOps
from light_moe.parallel.balancer import LOAD_SYNC_STEPS
from light_moe.parallel.groups import (
    ExpertParallelGroup,
    TorchrunLaunch,
    free_tcp_port,
    init_expert_parallel,
)
from light_moe.parallel.placement import ExpertPlacement

logger = logging.getLogger(__name__)

__all__ = ["ExpertParallelExecutor", "RankCall", "WorkerSpec", "follow_rank0", "free_device_memory", "torchrun_worker",
           "worker_main"]

SHUTDOWN_JOIN_S = 10.0


def follow_rank0(group: ExpertParallelGroup, model_path: str | None = None) -> None:
    """The worker loop of ranks 1..N-1, whichever way they were started: follow rank 0's messages (build a
    model, run steps, calls) until None. model_path, if given, replaces the path in every WorkerSpec (a
    torchrun rank reads the checkpoint from the path its own process was given: other hosts, temp dirs)."""
    executor = None
    while (message := broadcast_message(None, group)) is not None:
        if isinstance(message, WorkerSpec):
            if executor is not None:  # free the previous model (and its graphs) before building the next
                executor.release_graphs()
            executor = None
            free_device_memory()
            if model_path is not None:
                message = message.with_model_path(model_path)
            executor = RankExecutor(message, group)
        elif isinstance(message, RankCall):
            message.fn(executor, *message.args)
        else:
            executor.run(message)
    if executor is not None:
        executor.release_graphs()  # before the caller destroys the group
    # the shutdown handshake: no rank tears its group down while a peer may still be talking to it
    dist.barrier(group=group.cpu_group)


def worker_main(rank: int, world_size: int, init_method: str, device: torch.device, timeout_s: float,
                errors, started) -> None:
    """Entry point of spawned ranks 1..N-1: follow rank 0's messages (build a model, run steps) until None.
    `started` gets this rank before it joins the rendezvous (see ExpertParallelExecutor._await_workers)."""
    started.put(rank)
    group = None
    # `kill -USR1 <pid>` prints this rank's Python stacks to its stderr (diagnosing a stuck collective)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        if device.type == "cpu":  # N processes share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        group = init_expert_parallel(rank, world_size, init_method, device, timeout_s)
        follow_rank0(group)
    except BaseException:  # noqa: B902 - report anything, then exit non-zero
        text = traceback.format_exc()
        print(f"light-moe expert-parallel rank {rank} failed:\n{text}", file=sys.stderr, flush=True)  # for logs
        errors.put((rank, text))
        sys.exit(1)
    finally:
        if group is not None:
            group.destroy()


def torchrun_worker(launch: TorchrunLaunch, device: torch.device, timeout_s: float, model_path: str) -> None:
    """Rank launch.rank > 0 of a torchrun job: join the env:// rendezvous, follow rank 0 until it shuts down,
    leave the group and return (the engine then ends the process). Errors propagate (the process exits
    non-zero with the traceback; torchrun then reports the job failed)."""
    if launch.rank == 0:
        raise ValueError("rank 0 of a torchrun job is the engine, not a worker")
    group = init_expert_parallel(launch.rank, launch.world_size, "env://", device, timeout_s,
                                 device_index=launch.local_rank)
    try:
        follow_rank0(group, model_path)
    finally:
        group.destroy()


def _shutdown_at_exit(ref) -> None:
    executor = ref()
    if executor is not None:
        executor.shutdown()


class ExpertParallelExecutor:
    """Rank 0's side: spawns ranks 1..N-1 once, then builds models on all ranks (load) and runs steps.

    The engine creates one per expert-parallel engine; a caller may instead create one and pass
    it to several engines in turn (a benchmark sweep over placements, the tests) to pay the
    process start-up (~3 s of imports per rank) once.

    With `torchrun` (a TorchrunLaunch of rank 0) nothing is spawned: ranks 1..N-1 were started by
    torchrun and run `torchrun_worker`; the group uses the env:// rendezvous. Their processes are not
    ours to watch, so a dead or stuck rank shows only as a failed collective (at once when its sockets
    close, else after timeout_s). The workers are told to stop at shutdown(), or at interpreter exit."""

    def __init__(self, world_size: int, device: torch.device, timeout_s: float,
                 torchrun: TorchrunLaunch | None = None):
        if dist.is_initialized():  # before spawning anything
            raise RuntimeError(
                "torch.distributed is already initialised in this process: one expert-parallel executor per "
                "process (shut down the previous engine or executor first)")
        if torchrun is not None and (torchrun.rank != 0 or torchrun.world_size != world_size):
            raise ValueError(f"the executor is rank 0 of {world_size}; torchrun launched rank {torchrun.rank} "
                             f"of {torchrun.world_size}")
        self.world_size, self.device = world_size, device
        self.torchrun = torchrun
        self._errors = None
        self._workers = []
        if torchrun is None:
            ctx = mp.get_context("spawn")
            self._errors = ctx.Queue()
            started = ctx.Queue()
            init_method = f"tcp://127.0.0.1:{free_tcp_port()}"
            self._workers = [
                ctx.Process(target=worker_main, name=f"light-moe-ep-rank{rank}", daemon=True,
                            args=(rank, world_size, init_method, device, timeout_s, self._errors, started))
                for rank in range(1, world_size)
            ]
        else:
            init_method = "env://"
        self._failure: str | None = None
        self._closed = False
        self.group: ExpertParallelGroup | None = None
        self.rank: RankExecutor | None = None
        self.placements: tuple[ExpertPlacement, ...] = ()  # as of the last plan sent
        self._pending_placements: tuple[ExpertPlacement, ...] | None = None
        self._steps = 0
        self.fixed_capacity_tokens = 0
        for proc in self._workers:
            proc.start()
        try:
            if self._workers:
                self._await_workers(started, timeout_s)
            self.group = init_expert_parallel(0, world_size, init_method, device, timeout_s,
                                              device_index=None if torchrun is None else torchrun.local_rank)
            if torchrun is not None:  # the workers live until told to stop: tell them even if nobody shuts down
                atexit.register(_shutdown_at_exit, weakref.ref(self))
        except BaseException as exc:
            failure = self._fail(f"expert-parallel start-up failed: {exc}")
            self.shutdown()
            raise RuntimeError(failure) from exc

    def _await_workers(self, started, timeout_s: float) -> None:
        """Wait until every spawned worker runs worker_main. A worker that dies before (it could not import
        the parent's main module or the package, say) never reaches the rendezvous, which would otherwise
        wait timeout_s for it: here its death is an error within a fraction of a second."""
        waiting, deadline = set(range(1, self.world_size)), time.monotonic() + timeout_s
        while waiting:
            try:
                waiting.discard(started.get(timeout=0.1))
                continue
            except queue.Empty:
                pass
            dead = [f"rank {r} (pid {p.pid}) exit code {p.exitcode}" for r, p in enumerate(self._workers, start=1)
                    if r in waiting and not p.is_alive()]
            if dead:
                raise RuntimeError("worker process died before joining: " + "; ".join(dead) + " (its stderr says why)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ranks {sorted(waiting)} did not start within {timeout_s:.0f} s")

    def load(self, spec: WorkerSpec, ops: MoEOps) -> tuple[MoECausalLM, ModelRunner]:
        """Build spec's model on every rank (replacing any earlier one); returns rank 0's share."""
        if spec.world_size != self.world_size or spec.config.device.type != self.device.type:
            raise ValueError(f"model wants {spec.world_size} ranks on {spec.config.device.type}, the executor has "
                             f"{self.world_size} on {self.device.type}")
        self._check_workers(need_model=False)
        if self.rank is not None:
            self.rank.release_graphs()
            self.rank = None
            free_device_memory()
        self.placements, self._pending_placements, self._steps = tuple(spec.placements), None, 0
        self.fixed_capacity_tokens = spec.config.parallel.fixed_capacity_tokens
        try:
            broadcast_message(spec, self.group)
            self.rank = RankExecutor(spec, self.group, ops)
        except Exception as exc:
            raise RuntimeError(self._fail(f"expert-parallel model build failed ({type(exc).__name__}: {exc})")) from exc
        return self.rank.model, self.rank.runner

    @property
    def failed(self) -> bool:
        return self._failure is not None

    @property
    def worker_processes(self) -> list:
        return list(self._workers)

    # ---- steps --------------------------------------------------------------------------------
    def _owner_and_table(self, request) -> tuple[int, list[int]]:
        """The owner rank of a request and its block table in that rank's ids. The engine's
        PartitionedBlockManager gives every request blocks of one rank's partition (global id = rank *
        blocks_per_rank + local id), so the blocks say where its KV cache, and its attention, live."""
        per_rank = self.rank.runner.num_blocks
        table = request.block_table
        owner = table[0] // per_rank
        if table[-1] // per_rank != owner:
            raise RuntimeError(f"request {request.request_id!r} holds blocks of two ranks' partitions")
        return owner, [b - owner * per_rank for b in table]

    def set_placements(self, placements: list[ExpertPlacement]) -> None:
        """Every rank switches to these at the next step boundary (carried by the next StepPlan)."""
        if len(placements) != len(self.placements) or any(p.world_size != self.world_size for p in placements):
            raise ValueError(f"expected {len(self.placements)} placements over {self.world_size} ranks")
        self._pending_placements = tuple(placements)

    @property
    def next_placements(self) -> tuple[ExpertPlacement, ...]:
        """The placements the next step runs with (pending ones, else the current ones)."""
        return self._pending_placements if self._pending_placements is not None else self.placements

    def take_load(self) -> torch.Tensor | None:
        """[L, E + N] statistics reduced after the last collect_load step, once they have reached the host
        (None if none since the last take, or still on the way)."""
        load = self.rank.last_load
        if load is None or not load.ready():
            return None
        self.rank.last_load = None
        return load.get()

    def call(self, fn, *args):
        """fn(rank_executor, *args) on every rank (see RankCall); returns rank 0's result."""
        self._check_workers()
        try:
            broadcast_message(RankCall(fn, args), self.group)
            return fn(self.rank, *args)
        except Exception as exc:
            raise RuntimeError(self._fail(f"expert-parallel call failed ({type(exc).__name__}: {exc})")) from exc

    def plan(self, scheduled: list[ScheduledRequest], prev_samples: int = 0) -> StepPlan:
        sequences = []
        for s in scheduled:
            req = s.request
            start = req.num_computed_tokens
            tokens = req.tokens(start, start + s.num_new_tokens)
            owner, table = self._owner_and_table(req)
            sequences.append(PlannedSequence(owner, start, tokens, table, s.is_prefill, s.samples))
        placements, self._pending_placements = self._pending_placements, None
        if placements is not None:
            self.placements = placements
        self._steps += 1
        tokens = [0] * self.world_size
        for seq in sequences:
            tokens[seq.owner] += len(seq.tokens)
        capacity = exchange_capacity(tokens, self.rank.model.config.top_k, self.fixed_capacity_tokens)
        pending = prev_samples if prev_samples and any(has_pending(seq.tokens) for seq in sequences) else 0
        return StepPlan(sequences, placements, collect_load=self._steps % LOAD_SYNC_STEPS == 0,
                        exchange_capacity=capacity, prev_samples=pending)

    def execute(self, scheduled: list[ScheduledRequest], prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Like ModelRunner.execute, over all ranks: float32 logits [S, V] of the sampling rows."""
        self._check_workers()
        plan = self.plan(scheduled, 0 if prev_tokens is None else prev_tokens.numel())
        try:
            broadcast_message(plan, self.group)
            return self.rank.run(plan, prev_tokens)
        except Exception as exc:
            raise RuntimeError(self._fail(f"expert-parallel step failed ({type(exc).__name__}: {exc})")) from exc

    # ---- failures and shutdown ----------------------------------------------------------------
    def _check_workers(self, need_model: bool = True) -> None:
        if self._closed:
            raise RuntimeError("the expert-parallel executor was shut down")
        if self._failure is not None:
            raise RuntimeError(self._failure)
        if any(not p.is_alive() for p in self._workers):
            raise RuntimeError(self._fail("expert-parallel worker died between steps"))
        if need_model and self.rank is None:
            raise RuntimeError("no model is loaded on the expert-parallel executor (call load first)")

    def _fail(self, what: str) -> str:
        """Record the failure with what is known of the dead ranks; the executor stays failed."""
        for proc in self._workers:
            proc.join(timeout=0.5)  # a peer that broke the collective is usually exiting
        if self.torchrun is not None:
            self._failure = (f"{what}; the other ranks were started by torchrun: see their logs (a dead rank "
                             "breaks a collective at once, a stuck one after collective_timeout_s)")
            logger.error(self._failure)
            return self._failure
        reports = {}
        while True:
            try:
                rank, text = self._errors.get(timeout=0.1)
            except Exception:  # queue.Empty, or the queue is gone
                break
            reports[rank] = text.strip().splitlines()[-1]
        dead = [f"rank {r} (pid {p.pid}) exit code {p.exitcode}" + (f": {reports[r]}" if r in reports else "")
                for r, p in enumerate(self._workers, start=1) if not p.is_alive()]
        self._failure = f"{what}; " + ("; ".join(dead) if dead else "no worker exited (collective timeout?)")
        logger.error(self._failure)
        return self._failure

    def shutdown(self) -> None:
        """Stop the workers (politely when healthy, else terminate) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        healthy = self._failure is None and self.group is not None and all(p.is_alive() for p in self._workers)
        if healthy:
            try:
                broadcast_message(None, self.group)
                dist.barrier(group=self.group.cpu_group)  # every rank got it (see follow_rank0)
            except Exception as exc:  # a worker died just now: terminate below
                logger.warning("expert-parallel shutdown message failed: %s", exc)
        for proc in self._workers:
            proc.join(timeout=SHUTDOWN_JOIN_S if healthy else 0.5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if healthy and self.rank is not None:  # (a failed group may never drain: don't synchronise on it)
            self.rank.release_graphs()  # captured collectives before the communicator (see DecodeGraphs.release)
        if self.group is not None:
            self.group.destroy()
        if self._errors is not None:
            self._errors.close()
