"""zstudio: a local studio for Tongyi-MAI's Z-Image-Turbo.

from zstudio import get_generator
paths, seconds, metadata = get_generator().generate(prompt="a red fox in snow", seed=42)
"""

__version__ = "0.1.0"

from .engine import GenerationCancelled, GenerationResult, Generator, get_generator  # noqa: E402
from .params import GenerationParams, ParamError  # noqa: E402

__all__ = [
    "GenerationCancelled",
    "GenerationParams",
    "GenerationResult",
    "Generator",
    "ParamError",
    "__version__",
    "get_generator",
]
