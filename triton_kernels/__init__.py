"""Triton kernels for decode: one module per op, each with `_<op>_kernel`, launcher `<op>()` and `<op>_ref()`."""

from fusedlis.triton_kernels.decode_attention import (
    decode_attention,
    decode_attention_configs,
    decode_attention_default_config,
    decode_attention_key,
    decode_attention_ref,
)
from fusedlis.triton_kernels.embedding import embedding, embedding_ref
from fusedlis.triton_kernels.linear import (
    linear,
    linear_configs,
    linear_default_config,
    linear_key,
    linear_ref,
)
from fusedlis.triton_kernels.rmsnorm import rmsnorm, rmsnorm_ref
from fusedlis.triton_kernels.rope import rope, rope_ref
from fusedlis.triton_kernels.sampling import sample, sample_ref, top_p_mask_ref

from fusedlis.triton_kernels.linear_allreduce import (FusedAllReduceWorkspace, linear_allreduce,  # noqa: F401
                                                      linear_allreduce_config, linear_allreduce_ref,
                                                      simulate_linear_allreduce)

__all__ = [
    "decode_attention", "decode_attention_configs", "decode_attention_default_config", "decode_attention_key",
    "decode_attention_ref", "embedding", "embedding_ref", "linear", "linear_configs", "linear_default_config",
    "linear_key", "linear_ref", "rmsnorm", "rmsnorm_ref", "rope", "rope_ref", "sample", "sample_ref",
    "top_p_mask_ref", "FusedAllReduceWorkspace", "linear_allreduce", "linear_allreduce_config",
    "linear_allreduce_ref", "simulate_linear_allreduce",
]
