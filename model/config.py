"""Llama 3.x configuration: a dataclass read from a Hugging Face config.json, with named presets."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config.json or a requested setting that fusedlis cannot run."""


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes and hyper-parameters of a Llama-3-family decoder.

    Build one from a checkpoint with `LlamaConfig.from_hf(path_or_dict)` or by name with
    `LlamaConfig.preset("llama-3.1-8b")`. `rope_scaling` is None or a dict with `rope_type` "llama3"
    (keys factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{f} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_scaling is not None:
            rtype = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rtype in (None, "default"):
                object.__setattr__(self, "rope_scaling", None)
            elif rtype != "llama3":
                raise ConfigError(f"unsupported rope_scaling type {rtype!r}: fusedlis supports 'llama3' and none")
            else:
                missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings") if k not in self.rope_scaling]
                if missing:
                    raise ConfigError(f"rope_scaling of type llama3 lacks {missing}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count (embeddings and LM head counted once each unless tied)."""
        h = self.hidden_size
        per_layer = (h * (self.q_size + 2 * self.kv_size) + self.q_size * h
                     + 3 * h * self.intermediate_size + 2 * h)
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + emb + h

    def validate_tp(self, tp_size: int) -> None:
        """Raise ConfigError if this model cannot be split `tp_size` ways."""
        if not isinstance(tp_size, int) or tp_size < 1:
            raise ConfigError(f"tp_size must be a positive integer, got {tp_size!r}")
        for what, n in (("num_attention_heads", self.num_attention_heads),
                        ("num_key_value_heads", self.num_key_value_heads),
                        ("intermediate_size", self.intermediate_size)):
            if n % tp_size:
                raise ConfigError(f"tensor parallel size {tp_size} does not divide {what} ({n})")

    # ---- constructors --------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> "LlamaConfig":
        """Read a Hugging Face Llama config (a dict, a config.json path, or a checkpoint directory)."""
        where = "config"
        if isinstance(source, dict):
            cfg = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            if not os.path.exists(path):
                raise ConfigError(f"{path}: no config.json found")
            try:
                with open(path, encoding="utf-8") as f:
                    cfg = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: malformed JSON ({e})") from e
            if not isinstance(cfg, dict):
                raise ConfigError(f"{path}: expected a JSON object")
        model_type = cfg.get("model_type")
        if model_type != "llama":
            archs = cfg.get("architectures")
            raise ConfigError(f"{where}: unsupported architecture model_type={model_type!r} "
                              f"(architectures={archs}); fusedlis runs Llama-family models (model_type 'llama')")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: unsupported hidden_act {cfg['hidden_act']!r} (only 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ConfigError(f"{where}: {flag}=true is not supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ConfigError(f"{where}: missing required fields {missing}")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        rope = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        eos = cfg.get("eos_token_id")
        eos_t = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        try:
            return cls(
                vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=float(rope_theta),
                rope_scaling=scaling, max_position_embeddings=cfg.get("max_position_embeddings", 131072),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos_t, torch_dtype=str(dtype),
                name=str(cfg.get("_name_or_path") or "custom"),
            )
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The config as a Hugging Face config.json dict (what `from_hf` reads back)."""
        d = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "torch_dtype": self.torch_dtype, "_name_or_path": self.name,
        }
        return d

    @classmethod
    def preset(cls, name: str) -> "LlamaConfig":
        """A named preset: one of `PRESETS` (e.g. 'llama-3.1-8b', 'tiny')."""
        key = name.lower()
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[key]

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


_LLAMA31_COMMON = dict(
    vocab_size=128256, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
    max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000,
    eos_token_id=(128001, 128008, 128009), torch_dtype="bfloat16",
)

PRESETS: dict[str, LlamaConfig] = {
    "llama-3.1-8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, name="llama-3.1-8b",
                                **_LLAMA31_COMMON),
    "llama-3.1-70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, name="llama-3.1-70b",
                                 **_LLAMA31_COMMON),
    "llama-3.1-405b": LlamaConfig(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                                  num_attention_heads=128, num_key_value_heads=8, name="llama-3.1-405b",
                                  **_LLAMA31_COMMON),
    # Small enough for the CPU interpreter; GQA 2:1, llama3 rope scaling, splits up to tp=4.
    "tiny": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-5,
                        rope_theta=10000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                        max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=256,
                        eos_token_id=(257,), torch_dtype="float32", name="tiny"),
}
