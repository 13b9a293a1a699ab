"""Expert-parallel processes on CPU: a killed, stuck or never-started worker is an error on rank 0, not a
hang; plans cross in fixed-size frames; torchrun launches (the same tokens, clean exit, a dead rank)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from light_moe import LightMoEEngine, SamplingParams
from tests.ep_helpers import ENGINE_ARGS, PROMPTS, REPO, repo_env, run_script
from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))


FAILURE_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from light_moe import LightMoEEngine, SamplingParams

    path, timeout = sys.argv[1], float(sys.argv[2])
    params = SamplingParams(max_tokens=4, temperature=0.0)

    def step_error(sig, bypass_liveness_check=False):
        engine = LightMoEEngine(path, dtype="float32", device="cpu", show_progress=False,
                                expert_parallel_size=2, collective_timeout_s=timeout)
        assert engine.generate([1, 2, 3], params)  # healthy first
        if bypass_liveness_check:  # let the step reach the collectives with a dead peer
            engine.workers._check_workers = lambda need_model=True: None
        worker = engine.workers.worker_processes[0]
        os.kill(worker.pid, sig)
        start = time.monotonic()
        try:
            engine.generate([[1, 2, 3], [4, 5, 6]], params)
        except RuntimeError as exc:
            elapsed = time.monotonic() - start
            message = str(exc)
        else:
            raise AssertionError("no error after a worker was killed")
        try:  # the executor stays failed: later calls raise at once
            engine.generate([1, 2, 3], params)
            raise AssertionError("no error on the second call")
        except RuntimeError:
            pass
        engine.shutdown()
        print(f"signal={sig} elapsed={elapsed:.2f}s: {message}", flush=True)
        return elapsed, message

    if __name__ == "__main__":
        # a killed worker: the collective fails as soon as the peer's socket closes
        elapsed, message = step_error(signal.SIGKILL, bypass_liveness_check=True)
        assert elapsed < timeout and "rank 1" in message and "exit code -9" in message, message
        # a stuck worker (stopped, still alive): the collective timeout ends the wait
        elapsed, message = step_error(signal.SIGSTOP)
        assert timeout - 1 < elapsed < timeout + 10 and "timeout" in message, message
        print("OK")
""")


def test_killed_worker_is_an_error_on_rank_0_not_a_hang(qwen3_moe, tmp_path):
    print(run_script(tmp_path, FAILURE_SCRIPT, str(qwen3_moe), "5.0"))


STARTUP_FAILURE_SCRIPT = textwrap.dedent("""
    import os, time
    import torch
    from light_moe.executor.workers import ExpertParallelExecutor

    if __name__ == "__main__":
        os.remove(__file__)  # a spawned worker re-runs this main module: it dies before worker_main
        start = time.monotonic()
        try:
            ExpertParallelExecutor(2, torch.device("cpu"), timeout_s=120.0)
        except RuntimeError as exc:
            took = time.monotonic() - start
            assert "died before joining" in str(exc) and "rank 1" in str(exc), exc
            assert took < 60, took  # not the 120 s rendezvous timeout
            print("OK", round(took, 1))
        else:
            raise AssertionError("the executor started without its worker")
""")


def test_worker_dying_at_start_up_is_an_error_at_once(tmp_path):
    """A spawned rank that dies before the rendezvous (here: it cannot re-import the main module) fails the
    executor within seconds instead of after the rendezvous timeout."""
    print(run_script(tmp_path, STARTUP_FAILURE_SCRIPT, timeout_s=110))


BROADCAST_SCRIPT = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from light_moe.parallel.groups import FRAME_BYTES, broadcast_pickled

    def main(rank, world, port):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        messages = [None, {"plan": [1, 2, 3]}, list(range(FRAME_BYTES)), b"x" * (FRAME_BYTES - 8 - 20), "end"]
        for i, message in enumerate(messages):  # small, exactly around the frame, several frames' worth
            got = broadcast_pickled(message if rank == 0 else "not me", rank, None)
            assert got == message, (rank, i)
        dist.destroy_process_group()
        if rank == 0:
            print("OK", flush=True)

    if __name__ == "__main__":
        mp.spawn(main, args=(3, int(sys.argv[1])), nprocs=3)
""")


def test_broadcast_of_plans_small_and_larger_than_one_frame(tmp_path):
    from light_moe.parallel.groups import free_tcp_port

    run_script(tmp_path, BROADCAST_SCRIPT, str(free_tcp_port()), timeout_s=120)


# a rank of a torchrun job: record the pid, build the EP=2 engine (collective timeout TIMEOUT seconds)
TORCHRUN_RANK = """
    import json, os, signal, sys, time
    from pathlib import Path
    from light_moe import LightMoEEngine, SamplingParams

    out = Path(sys.argv[2])
    rank = os.environ["RANK"]
    (out / f"pid{rank}").write_text(str(os.getpid()))
    engine = LightMoEEngine(sys.argv[1], expert_parallel_size=2, dtype="float32", device="cpu",
                            max_num_batched_tokens=16, show_progress=False, collective_timeout_s=TIMEOUT)
"""

TORCHRUN_SCRIPT = textwrap.dedent(TORCHRUN_RANK.replace("TIMEOUT", "60") + """
    (out / f"returned{rank}").write_text("")  # only rank 0 gets here
    prompts = json.loads(sys.argv[3])
    outputs = engine.generate_outputs(prompts, SamplingParams(max_tokens=int(sys.argv[4]), temperature=0.0))
    (out / "tokens.json").write_text(json.dumps([o.token_ids for o in outputs]))
    print("OK")
""")


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("torchrun_mixtral"))


def test_torchrun_launch_gives_the_same_greedy_tokens_and_exits_cleanly(tiny_mixtral, tmp_path):
    from light_moe.parallel.groups import free_tcp_port

    prompts, new_tokens = PROMPTS[:4], 8
    one = LightMoEEngine(tiny_mixtral, **ENGINE_ARGS)
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    expected = [o.token_ids for o in one.generate_outputs(prompts, greedy)]
    del one
    script = tmp_path / "torchrun_script.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = repo_env()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_tcp_port()), str(script), str(tiny_mixtral), str(tmp_path), json.dumps(prompts),
                           str(new_tokens)], capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO)
    errors = "\n".join(line for line in proc.stderr.splitlines() if "Warning" not in line)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + errors[:3000] + "\n...\n" + errors[-2000:]
    assert proc.stdout.count("OK") == 1  # rank 1 never returned from the constructor
    assert json.loads((tmp_path / "tokens.json").read_text()) == expected
    assert (tmp_path / "returned0").exists() and not (tmp_path / "returned1").exists()
    for rank in (0, 1):  # both processes are gone
        with pytest.raises(ProcessLookupError):
            os.kill(int((tmp_path / f"pid{rank}").read_text()), 0)


def test_torchrun_world_size_must_equal_expert_parallel_size(monkeypatch, tmp_path):
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but expert_parallel_size=4"):
        LightMoEEngine(tmp_path, expert_parallel_size=4, **ENGINE_ARGS)  # refused before anything is read
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but expert_parallel_size=1"):
        LightMoEEngine(tmp_path, **ENGINE_ARGS)


TORCHRUN_DEAD_RANK_SCRIPT = textwrap.dedent(TORCHRUN_RANK.replace("TIMEOUT", "30") + """
    os.kill(int((out / "pid1").read_text()), signal.SIGKILL)  # rank 1 waits for a step: kill it
    time.sleep(0.5)
    start = time.monotonic()
    try:
        engine.generate_outputs([[7, 3, 99], list(range(20, 31))], SamplingParams(max_tokens=8, temperature=0.0))
    except RuntimeError as exc:
        elapsed = time.monotonic() - start
        assert elapsed < 10 and "torchrun" in str(exc), (elapsed, str(exc))
        print("OK", elapsed, exc)
""")


def test_dead_rank_of_a_torchrun_job_is_an_error_on_rank_0(tiny_mixtral, tmp_path):
    """The ranks are started with torchrun's variables but without its agent (which would end rank 0 as
    soon as rank 1 died): rank 0 has no process to watch and must notice from the collective alone."""
    from light_moe.parallel.groups import free_tcp_port

    script = tmp_path / "dead_rank.py"
    script.write_text(TORCHRUN_DEAD_RANK_SCRIPT)
    port = str(free_tcp_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(tiny_mixtral), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env=repo_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=port, OMP_NUM_THREADS="1"))
             for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=90)
        assert procs[0].returncode == 0 and "OK" in out, out + err[-3000:]
        assert procs[1].wait(timeout=10) == -9
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
