"""CuTe DSL kernels for sm_90a, one module per kernel family (see docs/kernels.md)."""
