"""qwen2vl-jax: Qwen2-VL in pure-functional Flax Linen."""
from qwen2vl_jax.config import Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl_jax.inputs import prepare_inputs
from qwen2vl_jax.model import Qwen2VL
from qwen2vl_jax.rope import get_rope_index

__all__ = ["Qwen2VL", "Qwen2VLConfig", "TextConfig", "VisionConfig", "get_rope_index", "prepare_inputs"]
