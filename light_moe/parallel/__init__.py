"""Expert parallelism: process groups (groups.py), expert placement (placement.py), the token
dispatcher of the MoE layer (dispatch.py), two-batch overlap (overlap.py) and dynamic load
balancing (balancer.py). The worker processes live in light_moe/executor/workers.py;
the design is in docs/expert_parallel.md."""
