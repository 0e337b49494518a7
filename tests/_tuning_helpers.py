"""Shared pieces of the tuning tests: a tiny model config and a fixture that isolates the tuning cache."""

from types import SimpleNamespace

import pytest

from fusedlis.tuning import _lookup

TINY = SimpleNamespace(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, vocab_size=100, name="tiny-test")


@pytest.fixture
def iso(tmp_path, monkeypatch):
    """A private tuning cache directory, no FUSEDLIS_TUNING* overrides, lookup state reset before and after."""
    monkeypatch.setenv("FUSEDLIS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FUSEDLIS_TUNING_FILE", raising=False)
    monkeypatch.delenv("FUSEDLIS_TUNING", raising=False)
    _lookup.invalidate(reset_warning=True)
    yield tmp_path
    _lookup.invalidate(reset_warning=True)
