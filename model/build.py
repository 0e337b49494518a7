"""Build a model from a preset name or a checkpoint directory; the embedded `tiny` checkpoint."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from fusedlis.model.config import ConfigError, LlamaConfig, PRESETS
from fusedlis.model.llama import LlamaForCausalLM
from fusedlis.model.loader import load_shards, save_checkpoint
from fusedlis.model.parallel import TPContext
from fusedlis.paths import cache_dir

TINY_VERSION = "v1"


def hf_tensor_names(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensor names of a Llama checkpoint and their shapes."""
    h, i = config.hidden_size, config.intermediate_size
    names = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        names.update({
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (config.q_size, h), f"{p}.self_attn.k_proj.weight": (config.kv_size, h),
            f"{p}.self_attn.v_proj.weight": (config.kv_size, h), f"{p}.self_attn.o_proj.weight": (h, config.q_size),
            f"{p}.mlp.gate_proj.weight": (i, h), f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
        })
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (config.vocab_size, h)
    return names


def random_hf_tensors(config: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32
                      ) -> dict[str, torch.Tensor]:
    """Seeded random weights under Hugging Face names (deterministic for a given seed)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_tensor_names(config).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif "embed_tokens" in name:
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * shape[-1] ** -0.5
        out[name] = t.to(dtype)
    return out


def ensure_tiny_checkpoint(root: str | os.PathLike | None = None) -> Path:
    """Path of the embedded `tiny` checkpoint, writing it (seeded random weights) on first use."""
    path = Path(root) if root is not None else cache_dir() / "models" / f"tiny-{TINY_VERSION}"
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        cfg = PRESETS["tiny"]
        save_checkpoint(tmp, cfg, random_hf_tensors(cfg, seed=0))
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race and wrote the same files
            if not (path / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_checkpoint(path_or_preset: str | os.PathLike) -> tuple[LlamaConfig, Path | None]:
    """(config, checkpoint dir or None) for a directory, 'tiny', or another preset name (no weights)."""
    s = os.fspath(path_or_preset)
    if os.path.isdir(s):
        return LlamaConfig.from_hf(s), Path(s)
    if s.lower() == "tiny":
        p = ensure_tiny_checkpoint()
        return LlamaConfig.from_hf(p), p
    if s.lower() in PRESETS:
        return PRESETS[s.lower()], None
    if os.path.exists(s):
        raise ConfigError(f"{s}: expected a checkpoint directory (config.json + *.safetensors)")
    raise ConfigError(f"{s!r} is neither a checkpoint directory nor a preset ({sorted(PRESETS)})")


def load_model(path_or_preset: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", tp_rank: int = 0, tp_size: int = 1,
               kernels: str = "torch", random_weights: bool = False, group=None, comm=None,
               seed: int = 0, progress: bool = False) -> LlamaForCausalLM:
    """Load a Llama model for one tensor-parallel rank.

    `path_or_preset` is a Hugging Face checkpoint directory, `"tiny"` (embedded, written on first use) or a preset
    name with `random_weights=True`. Each rank reads only its own slices. With `tp_size > 1` a torch.distributed
    group must be initialised (or pass `comm`, any object with `all_reduce` / `all_gather`).
    """
    config, ckpt = resolve_checkpoint(path_or_preset)
    config.validate_tp(tp_size)
    if tp_size > 1 and comm is None:
        import torch.distributed as dist

        from fusedlis.comm import TorchDistBackend

        if not dist.is_initialized():
            raise RuntimeError("tp_size > 1 needs torch.distributed to be initialised (torchrun / init_process_group)")
        comm = TorchDistBackend(group)
        if comm.size != tp_size or comm.rank != tp_rank:
            raise ValueError(f"tp_rank/tp_size ({tp_rank}/{tp_size}) disagree with the process group "
                             f"({comm.rank}/{comm.size})")
    tp = TPContext(tp_rank, tp_size, comm)
    model = LlamaForCausalLM(config, tp, dtype=dtype, device=device, kernels=kernels)
    if random_weights:
        model.init_random(seed)
    elif ckpt is None:
        raise ConfigError(f"preset {os.fspath(path_or_preset)!r} has no embedded weights: pass a checkpoint "
                          "directory, or random_weights=True to benchmark its shapes")
    else:
        load_shards(model.shard_specs(), ckpt, progress=progress)
    return model.eval()
