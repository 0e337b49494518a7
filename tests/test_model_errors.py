"""Malformed checkpoints and unsupported settings fail with an error that names the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import fusedlis
from fusedlis.model import CheckpointError, ConfigError, LlamaConfig, random_hf_tensors, save_checkpoint

CFG = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=4, rope_theta=10000.0, max_position_embeddings=128)


def _write(path, tensors=None, cfg=CFG, **kw):
    return save_checkpoint(path, cfg, tensors if tensors is not None else random_hf_tensors(cfg), **kw)


def test_good_checkpoint_loads(tmp_path):
    _write(tmp_path)
    out = fusedlis.load_model(tmp_path)(torch.randint(0, 64, (1, 3)))
    assert torch.isfinite(out).all()


def test_missing_tensor(tmp_path):
    t = random_hf_tensors(CFG)
    del t["model.layers.1.mlp.up_proj.weight"]
    _write(tmp_path, t)
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        fusedlis.load_model(tmp_path)


def test_wrong_shape(tmp_path):
    t = random_hf_tensors(CFG)
    t["model.layers.0.self_attn.k_proj.weight"] = torch.randn(12, 16)
    _write(tmp_path, t)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*k_proj\.weight.*shape \[12, 16\], expected \[8, 16\]"):
        fusedlis.load_model(tmp_path)


def test_wrong_dtype(tmp_path):
    t = random_hf_tensors(CFG)
    t["model.norm.weight"] = torch.randint(0, 3, (16,), dtype=torch.int32)
    _write(tmp_path, t)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*dtype I32"):
        fusedlis.load_model(tmp_path)


def test_truncated_file(tmp_path):
    _write(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupt|truncated)"):
        fusedlis.load_model(tmp_path)


def test_corrupt_header(tmp_path):
    _write(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + f.read_bytes()[40:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt"):
        fusedlis.load_model(tmp_path)


def test_nan_weights(tmp_path):
    t = random_hf_tensors(CFG)
    t["model.layers.0.mlp.down_proj.weight"][3, 3] = float("nan")
    _write(tmp_path, t)
    with pytest.raises(CheckpointError, match=r"down_proj\.weight.*NaN"):
        fusedlis.load_model(tmp_path)


def test_sharded_index_points_to_missing_file(tmp_path):
    _write(tmp_path, max_shard_bytes=4000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=r"points to missing file"):
        fusedlis.load_model(tmp_path)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf()))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        fusedlis.load_model(tmp_path)


def test_unknown_architecture(tmp_path):
    _write(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*unsupported architecture.*mistral"):
        fusedlis.load_model(tmp_path)


def test_malformed_config_json(tmp_path):
    _write(tmp_path)
    (tmp_path / "config.json").write_text("{ 'hidden_size': ")
    with pytest.raises(ConfigError, match=r"config\.json: malformed JSON"):
        fusedlis.load_model(tmp_path)


def test_missing_config_fields(tmp_path):
    _write(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"missing required fields \['intermediate_size'\]"):
        fusedlis.load_model(tmp_path)


def test_unsupported_rope_scaling():
    d = CFG.to_hf()
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match="unsupported rope_scaling type 'yarn'"):
        LlamaConfig.from_hf(d)


@pytest.mark.parametrize("tp,what", [(3, "num_attention_heads"), (4, "num_key_value_heads")])
def test_tp_must_divide(tp, what):
    with pytest.raises(ConfigError, match=f"tensor parallel size {tp} does not divide {what}"):
        CFG.validate_tp(tp)


def test_preset_without_weights_and_unknown_name():
    with pytest.raises(ConfigError, match="no embedded weights"):
        fusedlis.load_model("llama-3.1-8b")
    with pytest.raises(ConfigError, match="neither a checkpoint directory nor a preset"):
        fusedlis.load_model("llama-9-zillion")


def test_bad_input_ids(tmp_path):
    _write(tmp_path)
    m = fusedlis.load_model(tmp_path)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 64\)"):
        m(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.randn(1, 3))


def test_file_not_modified_by_failed_load(tmp_path):
    """Nothing lost: a failed load leaves the checkpoint bytes unchanged."""
    t = random_hf_tensors(CFG)
    t["model.norm.weight"] = torch.randn(17)
    _write(tmp_path, t)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError):
        fusedlis.load_model(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_presets_are_llama31_shapes():
    c8 = LlamaConfig.preset("llama-3.1-8b")
    assert 7.9e9 < c8.num_parameters() < 8.1e9
    assert 70.0e9 < LlamaConfig.preset("llama-3.1-70b").num_parameters() < 71.0e9
    assert 400e9 < LlamaConfig.preset("llama-3.1-405b").num_parameters() < 410e9
    for name in ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"):
        LlamaConfig.preset(name).validate_tp(8)
    assert LlamaConfig.from_hf(c8.to_hf()) == c8
