"""Light-MoE: a high-performance inference engine for Mixture-of-Experts language models."""
from light_moe.engine.args import EngineArgs
from light_moe.engine.engine import LightMoEEngine
from light_moe.engine.outputs import RequestOutput
from light_moe.sampling_params import SamplingParams

__all__ = ["EngineArgs", "LightMoEEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
