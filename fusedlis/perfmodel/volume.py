"""Model shapes, parallel layouts and communication volume per step.

Volumes are payloads: the size of each collective's logical message (an all-reduce of a [T, hidden] tensor
counts T*hidden*bytes once), summed per step. `collectives.bytes_sent` turns a payload into per-GPU wire bytes.

TP (degree t) per step of T tokens: two all-reduces of [T, hidden] per layer (after attention's o-projection and
after the MLP's down-projection), one after the vocab-parallel embedding, and an all-gather of the logits
[rows, vocab] (rows = batch: only the last position of each sequence is sampled).
PP (s stages) per step: hidden states and residual [T, hidden] each cross every one of the s-1 boundaries; the
sampled ids (int64 per sequence) go from the last stage back to the first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# the LlamaConfig fields a shape carries (besides its name)
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "tie_word_embeddings")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that the model needs. Build from a config with `from_config`.

    Field checks are `fusedlis.model.LlamaConfig`'s (a `ConfigError`, which is a ValueError, names the field).
    """

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        try:
            self.llama_config()  # validates
        except ValueError as e:
            raise type(e)(f"model {self.name!r}: {e}") from e

    def llama_config(self) -> Any:
        """This shape as a `fusedlis.model.LlamaConfig` (other hyper-parameters at their defaults)."""
        from fusedlis.model import LlamaConfig

        return LlamaConfig(**{f: getattr(self, f) for f in _SHAPE_FIELDS}, name=self.name)

    @classmethod
    def from_config(cls, cfg: Any, name: str | None = None) -> "ModelShape":
        """From a `fusedlis.model.LlamaConfig`, or a Hugging Face config dict (read by `LlamaConfig.from_hf`;
        `model_type` defaults to "llama")."""
        from fusedlis.model import LlamaConfig

        if isinstance(cfg, dict):
            cfg = LlamaConfig.from_hf({"model_type": "llama", **cfg})
        if not isinstance(cfg, LlamaConfig):
            raise TypeError(f"expected a LlamaConfig or a config dict, got {type(cfg).__name__}")
        return cls(name=name or cfg.name, **{f: getattr(cfg, f) for f in _SHAPE_FIELDS})

    # parameter counts
    def layer_linear_params(self) -> dict[str, int]:
        """Weights of one layer's four GEMMs (qkv and gate_up merged), in elements."""
        h, hd = self.hidden_size, self.head_dim
        return {"qkv": h * (self.num_attention_heads + 2 * self.num_key_value_heads) * hd,
                "o": self.num_attention_heads * hd * h,
                "gate_up": 2 * h * self.intermediate_size,
                "down": self.intermediate_size * h}

    def num_params(self) -> int:
        """Total parameters (embedding counted once when tied)."""
        per_layer = sum(self.layer_linear_params().values()) + 2 * self.hidden_size
        emb = self.vocab_size * self.hidden_size
        return self.num_hidden_layers * per_layer + emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size


def model_shape(name_or_path: str) -> ModelShape:
    """A `LlamaConfig` preset by name (e.g. "llama-3.1-8b") or a HF-style config.json path."""
    from pathlib import Path

    from fusedlis.model import LlamaConfig

    p = Path(name_or_path)
    if p.suffix == ".json" or p.is_file():
        if not p.is_file():
            raise ValueError(f"model config file {name_or_path!r} does not exist")
        import json

        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a JSON object")
        try:
            return ModelShape.from_config(data, p.stem)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from e
    try:
        cfg = LlamaConfig.preset(name_or_path)
    except (KeyError, ValueError) as e:
        raise ValueError(f"unknown model {name_or_path!r}: {e}") from e
    return ModelShape.from_config(cfg, name_or_path)


@dataclass(frozen=True)
class Layout:
    """`tp` GPUs share each layer (tensor parallel); `pp` pipeline stages of consecutive layers."""

    tp: int
    pp: int

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    @property
    def name(self) -> str:
        if self.pp == 1:
            return f"tp{self.tp}"
        if self.tp == 1:
            return f"pp{self.pp}"
        return f"tp{self.tp}pp{self.pp}"

    def check(self, shape: ModelShape, gpus_per_node: int) -> None:
        """ValueError if the layout cannot run `shape` on nodes of `gpus_per_node` GPUs."""
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"layout {self.name}: tp and pp must be >= 1")
        if shape.num_attention_heads % self.tp:
            raise ValueError(f"layout {self.name}: {shape.num_attention_heads} attention heads do not split "
                             f"over tp={self.tp}")
        if self.pp > shape.num_hidden_layers:
            raise ValueError(f"layout {self.name}: pp={self.pp} exceeds {shape.num_hidden_layers} layers")
        if self.tp > gpus_per_node and self.tp % gpus_per_node:
            raise ValueError(f"layout {self.name}: tp={self.tp} spans nodes but is not a multiple of "
                             f"gpus_per_node={gpus_per_node}")
        if self.tp < gpus_per_node and gpus_per_node % self.tp:
            raise ValueError(f"layout {self.name}: tp={self.tp} does not divide gpus_per_node={gpus_per_node}")

    def tp_grid(self, gpus_per_node: int) -> tuple[int, int]:
        """(nodes, gpus per node) spanned by one TP group."""
        if self.tp <= gpus_per_node:
            return 1, self.tp
        return self.tp // gpus_per_node, gpus_per_node

    def boundary_crosses_node(self, stage: int, gpus_per_node: int) -> bool:
        """Whether the boundary before `stage` (1..pp-1) joins GPUs of different nodes."""
        return (stage * self.tp) % gpus_per_node == 0 or self.tp >= gpus_per_node


def parse_layout(text: str, gpus: int, gpus_per_node: int) -> Layout:
    """"tp" (all GPUs TP), "pp" (all PP), "hybrid" (TP inside a node, PP across nodes) or "tpXppY"."""
    t = text.strip().lower()
    if t == "tp":
        return Layout(gpus, 1)
    if t == "pp":
        return Layout(1, gpus)
    if t == "hybrid":
        tp = min(gpus_per_node, gpus)
        if gpus % tp:
            raise ValueError(f"layout hybrid: {gpus} GPUs is not a multiple of gpus_per_node={gpus_per_node}")
        return Layout(tp, gpus // tp)
    m = re.fullmatch(r"tp(\d+)(?:pp(\d+))?|pp(\d+)", t)
    if not m:
        raise ValueError(f"unknown layout {text!r}: use tp, pp, hybrid, or tpXppY (e.g. tp4pp8)")
    lay = Layout(int(m.group(1)), int(m.group(2) or 1)) if m.group(1) else Layout(1, int(m.group(3)))
    if lay.gpus != gpus:
        raise ValueError(f"layout {text!r} uses {lay.gpus} GPUs but --gpus is {gpus}")
    return lay


@dataclass(frozen=True)
class Volume:
    """Communication payload of one step, in bytes."""

    allreduce_count: int
    allreduce_bytes: int  # each all-reduce's message
    allgather_bytes: int  # gathered logits
    p2p_count: int
    p2p_bytes: int  # total over all boundaries and the id return

    @property
    def total(self) -> int:
        return self.allreduce_count * self.allreduce_bytes + self.allgather_bytes + self.p2p_bytes


def step_volume(shape: ModelShape, layout: Layout, tokens: int, rows: int, dtype_bytes: int = 2) -> Volume:
    """Payload of one forward step over `tokens` tokens that samples `rows` sequences.

    Decode: tokens = rows = batch. Prefill: tokens = batch * prompt, rows = batch.
    """
    if tokens < 1 or rows < 1:
        raise ValueError(f"tokens and rows must be >= 1, got {tokens}, {rows}")
    act = tokens * shape.hidden_size * dtype_bytes
    n_ar = 2 * shape.num_hidden_layers + 1 if layout.tp > 1 else 0
    ag = rows * shape.vocab_size * dtype_bytes if layout.tp > 1 else 0
    n_p2p = 2 * (layout.pp - 1) if layout.pp > 1 else 0
    p2p = n_p2p * act + (rows * 8 if layout.pp > 1 else 0)
    return Volume(n_ar, act if n_ar else 0, ag, n_p2p + (1 if layout.pp > 1 else 0), p2p)
