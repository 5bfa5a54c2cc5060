"""Generation: `generate` (greedy and reproducible sampling), its logits processors, GenerationConfig and
streamers, following transformers 5.24's `generation/` package (docs/generation.md, docs/sampling.md).

>>> from qwen2np.generation import GenerationConfig
>>> GenerationConfig(max_new_tokens=8, do_sample=False).max_new_tokens
8
"""

from .config import GenerationConfig
from .streamers import BaseStreamer, TextIteratorStreamer, TextStreamer
from .utils import GenerationMixin

__all__ = ["BaseStreamer", "GenerationConfig", "GenerationMixin", "TextIteratorStreamer", "TextStreamer"]
