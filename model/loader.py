"""Load Llama weights from Hugging Face safetensors, reading only this rank's slices."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from fusedlis.model.config import LlamaConfig
from fusedlis.model.parallel import ShardSpec

_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


def find_weight_files(path: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it (sharded index or a scan)."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e!r})") from e
        out = {}
        for name, fname in weight_map.items():
            f = root / fname
            if not f.exists():
                raise CheckpointError(f"{index}: tensor {name!r} points to missing file {fname!r}")
            out[name] = f
        return out
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors files (and no model.safetensors.index.json)")
    out = {}
    for f in files:
        with _open(f) as st:
            for name in st.keys():
                out[name] = f
    return out


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e


def load_shards(specs: list[ShardSpec], path: str | os.PathLike, progress: bool = True) -> None:
    """Copy every spec's checkpoint slice into its parameter, after checking names, shapes and dtypes."""
    files = find_weight_files(path)
    missing = sorted({s.hf_name for s in specs if s.hf_name not in files})
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{more}")
    by_file: dict[Path, list[ShardSpec]] = defaultdict(list)
    for s in specs:
        by_file[files[s.hf_name]].append(s)
    bar = tqdm(total=len(specs), desc="loading weights", unit="tensor", disable=not progress, leave=False)
    with torch.no_grad():
        for f, fspecs in by_file.items():
            with _open(f) as st:
                for s in fspecs:
                    _copy_slice(st, f, s)
                    bar.update(1)
    bar.close()


def _copy_slice(st, f: Path, s: ShardSpec) -> None:
    try:
        sl = st.get_slice(s.hf_name)
        shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read tensor {s.hf_name!r} ({e})") from e
    if shape != tuple(s.full_shape):
        raise CheckpointError(f"{f}: tensor {s.hf_name!r} has shape {list(shape)}, expected {list(s.full_shape)}")
    if dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"{f}: tensor {s.hf_name!r} has dtype {dtype}, expected one of "
                              f"{sorted(_FLOAT_DTYPES)}")
    length = s.length if s.length is not None else shape[s.dim]
    end = s.start + length
    try:
        part = sl[s.start:end] if s.dim == 0 else sl[:, s.start:end]
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{f}: tensor {s.hf_name!r} is truncated or corrupt ({e})") from e
    dst = s.param.narrow(0, s.dst_offset, length) if s.dim == 0 else s.param
    if tuple(part.shape) != tuple(dst.shape):
        raise CheckpointError(f"{f}: tensor {s.hf_name!r} slice has shape {list(part.shape)}, "
                              f"expected {list(dst.shape)}")
    if not torch.isfinite(part).all():
        raise CheckpointError(f"{f}: tensor {s.hf_name!r} holds NaN or Inf values")
    dst.copy_(part.to(dst.dtype))


def save_checkpoint(path: str | os.PathLike, config: LlamaConfig, tensors: dict[str, torch.Tensor],
                    max_shard_bytes: int | None = None) -> Path:
    """Write a Hugging Face-format directory (config.json + safetensors, sharded above max_shard_bytes)."""
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config.to_hf(), indent=2), encoding="utf-8")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if max_shard_bytes is None:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nb = v.numel() * v.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nb
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(root / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    return root
