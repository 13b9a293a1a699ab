"""The fixed-capacity expert exchange over NVLink peer-to-peer writes (parallel/p2p_exchange.py, ep_exchange="p2p").

On CPU: option validation (engine, config, CLI), the exchange's layout against a plain all-to-all, and the
dispatcher wired to a PeerExchange whose "symmetric memory" is files mapped by every rank (gloo barrier): bit
for bit the NCCL-path (here gloo) fixed exchange, two layers sharing one exchange, barriers strictly alternating
DISPATCH / COMBINE, and a dry run touching neither the inboxes nor the barrier.
On 2+ GPUs (marked gpu, multigpu): the real symmetric-memory exchange against NCCL all_to_all_single, eager and
replayed from a CUDA graph, with a deliberately slow rank (the one-barrier-per-exchange argument), the
dispatcher's p2p fixed exchange against its NCCL one (eager and graph-captured), and EP engines with
ep_exchange="p2p" and "nccl" giving the same greedy tokens.
"""
import textwrap
import threading

import pytest
import torch
import torch.distributed as dist

from light_moe import LightMoEEngine
from light_moe.cli import build_parser
from light_moe.cli import main as cli_main
from light_moe.config import ParallelConfig
from light_moe.parallel.p2p_exchange import COMBINE, DISPATCH, PeerExchange
from tests.ep_helpers import needs_gpus, run_script
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))


# ---- options and their validation ----------------------------------------------------------------
def test_config_accepts_p2p_only_for_the_fixed_expert_parallel_exchange():
    assert ParallelConfig().ep_exchange == "nccl"  # opt-in
    ParallelConfig(expert_parallel_size=2, fixed_capacity_tokens=64, ep_exchange="p2p")
    with pytest.raises(ValueError, match="ep_exchange must be one of"):
        ParallelConfig(expert_parallel_size=2, ep_exchange="nvshmem")
    with pytest.raises(ValueError, match="expert_parallel_size > 1"):
        ParallelConfig(expert_parallel_size=1, ep_exchange="p2p")
    with pytest.raises(ValueError, match="fixed_capacity_tokens > 0"):
        ParallelConfig(expert_parallel_size=2, fixed_capacity_tokens=0, ep_exchange="p2p")


def test_engine_refuses_p2p_on_cpu_before_spawning_anything(tiny_mixtral):
    with pytest.raises(ValueError, match="needs CUDA GPUs"):
        LightMoEEngine(tiny_mixtral, expert_parallel_size=2, ep_exchange="p2p", device="cpu", show_progress=False)
    assert not dist.is_initialized()  # refused before any process group or worker


def test_engine_refuses_p2p_across_hosts(tiny_mixtral, monkeypatch):
    """Under torchrun, LOCAL_WORLD_SIZE < WORLD_SIZE means ranks on other hosts: no shared NVLink domain."""
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="on one host"):
        LightMoEEngine(tiny_mixtral, expert_parallel_size=2, ep_exchange="p2p", device="cpu", show_progress=False)
    assert not dist.is_initialized()


def test_cli_flags():
    parser = build_parser()
    assert parser.parse_args(["generate", "hi"]).ep_exchange == "nccl"
    assert parser.parse_args(["generate", "hi", "--ep-exchange", "p2p"]).ep_exchange == "p2p"
    assert parser.parse_args(["bench", "ep", "--exchange", "p2p"]).exchange == "p2p"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "hi", "--ep-exchange", "shm"])
    # refused at once (exit code 2, "error: ..."), before any engine is built
    assert cli_main(["bench", "ep", "--exchange", "p2p", "--fixed-capacity", "0", "--device", "cpu"]) == 2
    assert cli_main(["bench", "ep", "--exchange", "p2p", "--device", "cpu"]) == 2
    assert cli_main(["bench", "e2e", "--ep-exchange", "p2p", "--device", "cpu"]) == 2


# ---- the exchange itself, ranks simulated by threads -----------------------------------------------
def _exchange_into(peer: PeerExchange, send: torch.Tensor, kind: int, results: list, rank: int) -> None:
    results[rank] = peer.exchange(send, kind)


@pytest.mark.parametrize("world", [2, 3])
def test_exchange_equals_an_equal_split_all_to_all(world):
    """Rank r's result, block p = rank p's send block r, for every dtype and width (the copy widens to
    int64 / int32 / int16 / uint8 as the block allows); a view of r's inbox; too large a send is refused."""
    inbox = 4096
    boxes = [[torch.zeros(inbox, dtype=torch.uint8) for _ in range(world)] for _ in (DISPATCH, COMBINE)]
    wait = threading.Barrier(world)
    channels = []
    peers = [PeerExchange(boxes, r, lambda channel: (channels.append(channel), wait.wait())) for r in range(world)]
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.uint8, 4, 36), (torch.bfloat16, 2, 10), (torch.float32, 3, 7), (torch.uint8, 1, 3),
             (torch.int32, 5, 1)]
    for dtype, capacity, width in cases:
        sends = [(torch.randn(world * capacity, width, generator=gen) * 100).to(dtype) for _ in range(world)]
        for kind in (DISPATCH, COMBINE):
            got = [None] * world
            threads = [threading.Thread(target=_exchange_into, args=(peers[r], sends[r], kind, got, r))
                       for r in range(world)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for r in range(world):
                expected = torch.cat([sends[p][r * capacity:(r + 1) * capacity] for p in range(world)])
                assert got[r].dtype == dtype and torch.equal(got[r], expected), (dtype, capacity, width, r)
                assert got[r].untyped_storage().data_ptr() == boxes[kind][r].untyped_storage().data_ptr()
    assert channels == ([DISPATCH] * world + [COMBINE] * world) * len(cases)  # one barrier per exchange and rank
    assert peers[0].max_rows(36) == inbox // (world * 36)
    with pytest.raises(RuntimeError, match="exceed"):
        peers[0].check(torch.zeros(world * (peers[0].max_rows(36) + 1), 36, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="equal blocks"):
        peers[0].check(torch.zeros(world * 2 + 1, 4, dtype=torch.uint8))


# ---- the dispatcher with a PeerExchange over shared files (CPU stand-in for symmetric memory) -------
CPU_PEER_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from light_moe.ops.backend import ReferenceOps
    from light_moe.parallel import placement as pl
    from light_moe.parallel.dispatch import AllToAllDispatcher
    from light_moe.parallel.p2p_exchange import PeerExchange

    INBOX = 1 << 16

    def shared_inboxes(folder, world):
        # every rank maps every rank's file, so a write through one mapping shows through all of them: the CPU
        # stand-in for symmetric memory (and dist.barrier for the device barrier)
        files = [torch.from_file(os.path.join(folder, f"rank{p}"), shared=True, size=2 * INBOX, dtype=torch.uint8)
                 for p in range(world)]
        return [[f[kind * INBOX:(kind + 1) * INBOX] for f in files] for kind in (0, 1)]

    def layer(d, ops, x, w, ids, w13, w2, capacity):
        d.capacity = capacity
        routed = d.dispatch(x, w, ids)
        seen = routed.x.clone(), routed.topk_ids.clone()  # what the experts read (an inbox view on p2p)
        y = ops.experts(routed.x, routed.topk_weights, routed.topk_ids, w13, w2, padded=routed.padded)
        return d.combine(y, routed), seen

    def main(rank, world, port, folder):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        torch.manual_seed(0)  # the same weights on every rank
        num_experts, hidden, inter, top_k = 8, 24, 16, 2
        w13_all, w2_all = torch.randn(num_experts, 2 * inter, hidden), torch.randn(num_experts, hidden, inter)
        ops, cpu = ReferenceOps(), torch.device("cpu")
        channels = []
        inboxes = shared_inboxes(folder, world)
        peer = PeerExchange(inboxes, rank, lambda channel: (channels.append(channel), dist.barrier()))
        placements = [pl.contiguous(num_experts, world), pl.round_robin(num_experts, world)]
        if world == 2:
            placements.append(pl.ExpertPlacement.from_local([[0, 1, 2, 3, 4], [0, 5, 6, 7]], num_experts))
        gen = torch.Generator().manual_seed(100 + rank)
        for placement in placements:
            local = list(placement.local_experts[rank])
            w13, w2 = w13_all[local], w2_all[local]
            nccl = AllToAllDispatcher(placement, rank, None, ops, cpu)  # gloo here: the NCCL code path
            layers = [AllToAllDispatcher(placement, rank, None, ops, cpu, peer=peer) for _ in range(2)]
            for tokens, capacity, skew in [(5, 16, False), (8, 16, False), (0 if rank else 3, 8, False),
                                           (4, 8, True), (1, 2, False)]:
                x = torch.randn(tokens, hidden, generator=gen)
                logits = torch.randn(tokens, num_experts, generator=gen)
                if skew:
                    logits[:, 5:] += 100.0  # every row to experts 5..7
                w, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
                ids = ids.to(torch.int32)
                before = int(nccl.rows_received)
                expected, expected_seen = layer(nccl, ops, x, w, ids, w13, w2, capacity)
                rows = int(nccl.rows_received) - before
                for d in layers:  # two layers, one exchange: the inboxes are reused layer after layer
                    before = int(d.rows_received)
                    got, seen = layer(d, ops, x, w, ids, w13, w2, capacity)
                    assert torch.equal(got, expected), (rank, placement, tokens, capacity)
                    assert all(torch.equal(a, b) for a, b in zip(seen, expected_seen))
                    assert int(d.rows_received) - before == rows  # real rows only, as on the collective path
                # a dry run (graph warm-up): the same kernels, no peer write, no barrier
                snapshot = [box.clone() for kind in inboxes for box in kind]
                count = len(channels)
                d = layers[0]
                d.dry_run = True
                try:
                    dry, _ = layer(d, ops, x, w, ids, w13, w2, capacity)
                finally:
                    d.dry_run = False
                assert dry.shape == expected.shape and len(channels) == count  # no barrier
                dist.barrier()  # every rank's dry run is over before anyone compares (no writes may have happened)
                assert all(torch.equal(a, b) for a, b in zip(snapshot, (box for kind in inboxes for box in kind)))
                dist.barrier()
        assert channels and channels == [0, 1] * (len(channels) // 2), channels  # DISPATCH, COMBINE, ...
        dist.destroy_process_group()
        if rank == 0:
            print("OK", flush=True)

    if __name__ == "__main__":
        from light_moe.parallel.groups import free_tcp_port
        world, folder = int(sys.argv[1]), sys.argv[2]
        for p in range(world):
            with open(os.path.join(folder, f"rank{p}"), "wb") as f:
                f.write(bytes(2 * INBOX))
        mp.spawn(main, args=(world, free_tcp_port(), folder), nprocs=world)
""")


@pytest.mark.parametrize("world", [2, 3])
def test_dispatcher_with_a_peer_exchange_is_bit_identical_to_the_collective_one(tmp_path, world):
    """Ranks as processes over gloo, inboxes in files every rank maps: the fixed exchange through the
    PeerExchange gives bit for bit the collective fixed exchange's rows, ids and output (contiguous,
    round-robin and copied experts, an idle rank, all rows to one rank, capacity 2), through two layers sharing
    one PeerExchange; barriers alternate DISPATCH / COMBINE; a dry run writes nothing and waits on no barrier."""
    folder = tmp_path / "inboxes"
    folder.mkdir()
    run_script(tmp_path, CPU_PEER_SCRIPT, str(world), str(folder), timeout_s=180)


# ---- GPUs ------------------------------------------------------------------------------------------
GPU_EXCHANGE_SCRIPT = textwrap.dedent("""
    import functools
    import sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from light_moe.ops.backend import ReferenceOps
    from light_moe.parallel import placement as pl
    from light_moe.parallel.dispatch import AllToAllDispatcher
    from light_moe.parallel.p2p_exchange import COMBINE, DISPATCH, PeerExchange

    MAX_ROWS, HIDDEN = 64, 48

    def nccl_all_to_all(send):
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        return recv

    def pattern(device, sender, index, shape):
        # the send buffer of rank `sender` for exchange `index`, reproducible on every rank (so the expected
        # result needs no collective that could hide a race)
        gen = torch.Generator(device=device).manual_seed(1 + 1000 * index + sender)
        return torch.randint(0, 256, shape, generator=gen, device=device, dtype=torch.uint8)

    def check_raw(peer, rank, world, device):
        for dtype in (torch.uint8, torch.bfloat16, torch.float32):
            for capacity in (1, 7, MAX_ROWS):
                for kind in (DISPATCH, COMBINE):
                    shape = (world * capacity, HIDDEN)
                    send = (pattern(device, rank, capacity, shape) if dtype == torch.uint8
                            else torch.randn(shape, device=device).to(dtype))
                    got = peer.exchange(send, kind).clone()
                    assert torch.equal(got, nccl_all_to_all(send)), (rank, dtype, capacity, kind)
        print(f"rank {rank}: raw exchange == NCCL", flush=True)

    def slow_sequence(peer, rank, world, sends, outs, sleep_cycles):
        # exchanges alternate DISPATCH / COMBINE; rank 1 dawdles after every exchange before it reads its inbox
        # (as slow experts or a slow weighted sum would), rank 0 before every write: the faster rank must
        # never overwrite an inbox that its peer has yet to read (one barrier per exchange suffices)
        for i, (send, out) in enumerate(zip(sends, outs)):
            if rank == 0 and i % 3 == 0:
                torch.cuda._sleep(sleep_cycles)
            got = peer.exchange(send, i % 2)
            if rank == 1:
                torch.cuda._sleep(sleep_cycles)
            out.copy_(got)

    def check_slow_rank(peer, rank, world, device, graph):
        capacity, steps = 16, 12
        shape = (world * capacity, 40)
        sends = [torch.empty(shape, dtype=torch.uint8, device=device) for _ in range(steps)]
        outs = [torch.empty_like(s) for s in sends]
        def fill(round_):
            for i, s in enumerate(sends):
                s.copy_(pattern(device, rank, 100 * round_ + i, shape))

        def verify(round_):
            torch.cuda.synchronize()
            for i, out in enumerate(outs):
                expected = torch.cat([pattern(device, p, 100 * round_ + i, shape)[rank * capacity:(rank + 1) * capacity]
                                      for p in range(world)])
                assert torch.equal(out, expected), (rank, "graph" if graph else "eager", round_, i)
        fill(0)
        slow_sequence(peer, rank, world, sends, outs, 2_000_000)
        verify(0)
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):  # nothing runs during the capture; every rank captures the same sequence
                slow_sequence(peer, rank, world, sends, outs, 2_000_000)
            for round_ in (1, 2, 3):
                fill(round_)
                g.replay()
                verify(round_)
            g.reset()
        print(f"rank {rank}: slow-rank sequence ok ({'graph' if graph else 'eager'})", flush=True)

    def random_inputs(gen, device, dtype, num_experts, top_k, tokens, skew=False):
        x = torch.randn(tokens, HIDDEN, generator=gen, device=device).to(dtype)
        logits = torch.randn(tokens, num_experts, generator=gen, device=device)
        if skew:
            logits[:, 5:] += 100.0  # every row to experts 5..7
        w, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
        return x, w, ids.to(torch.int32)

    def exchange_layer(d, x, w, ids):
        # dispatch -> (2 * received rows stands in for the experts) -> combine: graph-safe with the reference combine
        routed = d.dispatch(x, w, ids)
        return d.combine(routed.x * 2, routed)

    def check_dispatcher(peer, rank, world, device):
        ops = ReferenceOps()
        num_experts, top_k = 8, 2
        placements = [pl.contiguous(num_experts, world), pl.round_robin(num_experts, world)]
        if world == 2:
            placements.append(pl.ExpertPlacement.from_local([[0, 1, 2, 3, 4], [0, 5, 6, 7]], num_experts))
        gen = torch.Generator(device=device).manual_seed(7 + rank)
        torch.manual_seed(0)
        w13_all = torch.randn(num_experts, 32, HIDDEN, device=device)
        w2_all = torch.randn(num_experts, HIDDEN, 16, device=device)
        for dtype in (torch.float32, torch.bfloat16):
            for placement in placements:
                local = list(placement.local_experts[rank])
                w13, w2 = w13_all[local].to(dtype), w2_all[local].to(dtype)
                nccl = AllToAllDispatcher(placement, rank, dist.group.WORLD, ops, device)
                p2p = AllToAllDispatcher(placement, rank, dist.group.WORLD, ops, device, peer=peer)
                inputs = functools.partial(random_inputs, gen, device, dtype, num_experts, top_k)
                # eager, with the experts: rows, ids and output bit-identical
                for tokens, capacity, skew in [(5, 16, False), (0 if rank else 3, 8, False), (4, 8, True),
                                               (32, 64, False)]:
                    x, w, ids = inputs(tokens, skew)
                    outs = []
                    for d in (nccl, p2p):
                        d.capacity = capacity
                        routed = d.dispatch(x, w, ids)
                        seen = routed.x.clone(), routed.topk_ids.clone()
                        y = ops.experts(routed.x, routed.topk_weights, routed.topk_ids, w13, w2, padded=True)
                        outs.append((d.combine(y, routed), *seen))
                    for a, b in zip(*outs):
                        assert torch.equal(a, b), (rank, dtype, placement, tokens, capacity)
                # captured: warm-up as a decode graph's (dry run on a side stream), capture, replay new inputs
                for capacity, tokens in [(8, 4), (64, 32)]:
                    p2p.capacity = nccl.capacity = capacity
                    sx, sw, sids = inputs(tokens)
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    p2p.dry_run = True
                    with torch.cuda.stream(stream):
                        exchange_layer(p2p, sx, sw, sids)
                    p2p.dry_run = False
                    torch.cuda.current_stream().wait_stream(stream)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        out = exchange_layer(p2p, sx, sw, sids)
                    for _ in range(3):
                        x, w, ids = inputs(tokens)
                        sx.copy_(x), sw.copy_(w), sids.copy_(ids)
                        g.replay()
                        expected = exchange_layer(nccl, x, w, ids)
                        torch.cuda.synchronize()
                        assert torch.equal(out, expected), (rank, dtype, placement, capacity, "graph")
                    g.reset()
        print(f"rank {rank}: dispatcher p2p == NCCL (eager and graph)", flush=True)

    def main(rank, world, port):
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                device_id=device)
        row_bytes = AllToAllDispatcher.packed_layout(HIDDEN, 4)[1]  # float32 rows, the widest here
        peer = PeerExchange.symmetric(dist.group.WORLD, device, MAX_ROWS, row_bytes, timeout_s=120)
        check_raw(peer, rank, world, device)
        check_slow_rank(peer, rank, world, device, graph=False)
        check_slow_rank(peer, rank, world, device, graph=True)
        check_dispatcher(peer, rank, world, device)
        torch.cuda.synchronize()
        dist.barrier()
        del peer
        dist.destroy_process_group()
        if rank == 0:
            print("OK", flush=True)

    if __name__ == "__main__":
        import faulthandler
        from light_moe.parallel.groups import free_tcp_port
        faulthandler.dump_traceback_later(500, exit=True)  # a stuck barrier: show where, then fail
        world = int(sys.argv[1])
        mp.spawn(main, args=(world, free_tcp_port()), nprocs=world)
""")


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("gpus", [2, 4])
def test_gpus_p2p_exchange_is_bit_identical_to_nccl_eager_and_in_graphs(tmp_path, gpus):
    """Symmetric memory on N GPUs: the raw exchange equals all_to_all_single (uint8, bf16, fp32; capacity 1 to
    the maximum); a 12-exchange sequence with a slow rank is exact eagerly and replayed from a CUDA graph with
    new inputs; the dispatcher's p2p fixed exchange equals its NCCL one bit for bit (with the experts, eagerly;
    dispatch + combine captured after a dry-run warm-up and replayed with new inputs), fp32 and bf16."""
    needs_gpus(gpus)
    print(run_script(tmp_path, GPU_EXCHANGE_SCRIPT, str(gpus), timeout_s=600))


GPU_ENGINE_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from light_moe import LightMoEEngine, SamplingParams
    from light_moe.executor.workers import ExpertParallelExecutor

    prompts = [[7, 3, 99], list(range(20, 31)), list(range(100, 157)), list(range(200, 240)), [42] * 9]
    params = SamplingParams(max_tokens=20, temperature=0.0)

    if __name__ == "__main__":
        import faulthandler
        faulthandler.dump_traceback_later(500, exit=True)
        path, backend, dtype, gpus = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        args = dict(dtype=dtype, device="cuda", moe_backend=backend, max_num_batched_tokens=64, show_progress=False,
                    kv_cache_memory_bytes=64 << 20, expert_parallel_size=gpus, fixed_capacity_tokens=64,
                    collective_timeout_s=120)
        executor = ExpertParallelExecutor(gpus, torch.device("cuda"), timeout_s=120)
        results = {}
        try:
            # nccl, p2p twice (the second p2p engine frees the first one's symmetric memory and maps new buffers:
            # a rendezvous on every rank again), nccl again (were the kernels not deterministic, nccl would
            # differ from nccl too: the failure message shows all four)
            runs = ["nccl", "p2p", "p2p", "nccl"]
            for run, exchange in enumerate(runs):
                engine = LightMoEEngine(path, ep_exchange=exchange, expert_parallel_executor=executor, **args)
                dispatchers = engine.workers.rank.dispatchers
                assert (dispatchers[0].peer is not None) == (exchange == "p2p")
                assert len({id(d.peer) for d in dispatchers}) == 1  # one exchange shared by every layer
                tokens = [o.token_ids for o in engine.generate_outputs(prompts, params)]
                assert all(d.exchanges["fixed"] > 0 for d in dispatchers), [d.exchanges for d in dispatchers]
                graphs = engine.runner.decode_graphs
                captured = sorted(map(str, graphs.graphs)) if graphs is not None else []
                if backend == "cute":
                    assert captured, "EP decode never replayed a graph"
                print(f"{exchange}: graphs {captured}", flush=True)
                results[run] = tokens
                engine.shutdown()
        finally:
            executor.shutdown()
        assert all(results[run] == results[0] for run in results), {f"{r} {runs[r]}": results[r] for r in results}
        print("OK")
""")


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.parametrize("gpus", [2, 4])
@pytest.mark.parametrize("backend,dtype", [("reference", "float32"), ("cute", "bfloat16")])
def test_gpus_engine_with_p2p_exchange_gives_the_nccl_tokens(tmp_path, gpus, backend, dtype):
    """EP=N engines on one executor, ep_exchange nccl, p2p, p2p, nccl: the same greedy tokens. The exchange
    moves the same bytes to the same places, so they match exactly, in float32 on the reference backend (eager
    decode: its expert GEMMs read offsets on the host) and in bf16 on CuTe (decode CUDA graphs holding the
    peer writes and barriers; exact as long as the CuTe kernels are deterministic, which nccl vs nccl shows)."""
    needs_gpus(gpus)
    path = make_tiny_checkpoint("mixtral", tmp_path / "ckpt", hidden_size=128, intermediate_size=128)
    print(run_script(tmp_path, GPU_ENGINE_SCRIPT, str(path), backend, dtype, str(gpus), timeout_s=600))
