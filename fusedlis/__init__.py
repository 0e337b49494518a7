"""fusedlis: fast tensor-parallel LLM decode on Triton kernels, fusing compute with communication."""

from __future__ import annotations

__version__ = "0.1.0"

from fusedlis.model import LlamaConfig, load_model  # noqa: E402
from fusedlis.engine import Engine, GenerationResult  # noqa: E402

__all__ = ["Engine", "GenerationResult", "LlamaConfig", "load_model", "__version__"]
