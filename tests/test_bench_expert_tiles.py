"""bench/expert_tiles.py's config specs (CPU): each spec names exactly one TileConfig, bad specs fail early."""
import pytest

from light_moe.bench.expert_tiles import format_row, parse_config
from light_moe.kernels.tile_config import TileConfig


def test_specs():
    assert parse_config("256x64") == TileConfig(256, 64, "consumer")  # the table's fence for that tile
    assert parse_config("256x128") == TileConfig(256, 128, "producer")
    assert parse_config("256x128c") == TileConfig(256, 128, "consumer")
    assert parse_config("128x128pl3") == TileConfig(128, 128, "producer", cp_async_lag=3)
    assert parse_config("256x64@2") == TileConfig(256, 64, "consumer", cluster_t=2)
    assert parse_config("256x128p@2") == TileConfig(256, 128, "producer", cluster_t=2)
    for bad in ("256", "256x64@", "256x64x2", "table"):
        with pytest.raises(ValueError):
            parse_config(bad)
    with pytest.raises(ValueError, match="cluster_t"):
        parse_config("256x64@4")


def test_format_row():
    row = dict(tokens=1024, configs={"a": dict(up_us=1.0, down_us=2.0, total_us=3.0, up_TFLOPs=10, down_TFLOPs=20),
                                     "b": dict(wrong=True)}, unsupported=["c"])
    assert format_row(row) == "T=1024 | a: 1.0 + 2.0 = 3.0 us (10 / 20 TF) | b: WRONG | unsupported: c"
