"""Plot a `light-moe bench moe-layer` result: layer time per token count for ours and the baselines.

    python scripts/plot_moe_layer.py benchmarks/results/<result>.json benchmarks/plots/<name>.png

Needs matplotlib (not a dependency of the package).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = [
    ("ours_layer_graph_us", "Light-MoE CuTe layer (CUDA graph)"),
    ("w4a16_layer_graph_us", "Light-MoE W4A16 layer (CUDA graph)"),
    ("ours_layer_us", "Light-MoE CuTe layer (eager)"),
    ("grouped_mm_layer_us", "torch._grouped_mm layer (eager)"),
    ("loop_layer_us", "per-expert loop (eager)"),
    ("target_us", "target (DESIGN.md section 5)"),
]


def main(src: str, dst: str) -> None:
    result = json.load(open(src))
    rows = result["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label in SERIES:
        points = [(t, r[key]) for t, r in zip(tokens, rows) if r.get(key) is not None]
        if points:
            style = dict(linestyle="--", color="gray", marker="_") if key == "target_us" else dict(marker="o")
            ax.plot(*zip(*points), label=label, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("MoE layer time (us, median)")
    shape = result.get("shape", {})
    ax.set_title(f"MoE layer E={shape.get('E')} H={shape.get('H')} I={shape.get('I')} top-{shape.get('K')}, "
                 f"{result['env']['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
