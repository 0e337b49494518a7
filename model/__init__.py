"""Llama 3.x model: config + presets, tensor-parallel layers, safetensors loader."""

from fusedlis.model.build import ensure_tiny_checkpoint, load_model, random_hf_tensors, resolve_checkpoint
from fusedlis.model.config import PRESETS, ConfigError, LlamaConfig
from fusedlis.model.llama import KVCache, LlamaForCausalLM
from fusedlis.model.loader import CheckpointError, save_checkpoint
from fusedlis.model.parallel import TPContext

__all__ = ["PRESETS", "CheckpointError", "ConfigError", "KVCache", "LlamaConfig", "LlamaForCausalLM",
           "TPContext", "ensure_tiny_checkpoint", "load_model", "random_hf_tensors", "resolve_checkpoint",
           "save_checkpoint"]
