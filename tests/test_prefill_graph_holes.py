"""CPU checks of the piecewise prefill graphs' attention holes (light_moe/executor/prefill_graphs.py): what the
recorder keeps for the replay. A gpt-oss layer calls the backend's attention with its sinks and sliding window;
the replay must call it with the same arguments (an H100 run found them dropped: a TypeError at capture)."""
import torch

from light_moe.executor.prefill_graphs import _AttentionRecorder


class _FakeCapture:
    def __init__(self):
        self.holes = []

    def split(self, hole):
        self.holes.append(hole)


class _Backend:
    def rms_norm(self):
        return "passed through"


def test_recorder_keeps_the_attention_variant():
    capture, out = _FakeCapture(), torch.zeros(8, 2, 4)
    recorder = _AttentionRecorder(_Backend(), capture, out)
    q, k, v, sinks = torch.randn(3, 2, 4), torch.zeros(1), torch.zeros(1), torch.randn(2)
    got = recorder.attention(q, k, v, None, 0.5, sinks=sinks, sliding_window=128)
    assert got.data_ptr() == out.data_ptr() and got.shape[0] == 3
    op, q_kept, tensors, scale, out_kept, variant = capture.holes[0]
    assert op == "attention" and q_kept is q and tensors == (k, v) and scale == 0.5 and out_kept is out
    assert variant["sinks"] is sinks and variant["sliding_window"] == 128
    recorder.attention(q, k, v, None, 0.5)  # plain causal attention: no variant arguments
    assert capture.holes[1][-1] == {}
    recorder.mla_attention(q, k, v, None, 0.5)
    assert capture.holes[2][0] == "mla_attention" and capture.holes[2][-1] == {}
    assert recorder.rms_norm() == "passed through"
