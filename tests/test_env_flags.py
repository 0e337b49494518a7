"""The boolean FUSEDLIS_* switches: one reading everywhere, and a typo is an error naming the variable."""

import pytest

from fusedlis._env import env_flag


@pytest.mark.parametrize("raw,expect", [("1", True), ("On", True), (" true ", True), ("YES", True), ("0", False),
                                        ("off", False), ("False", False), ("no", False)])
def test_values(monkeypatch, raw, expect):
    monkeypatch.setenv("FUSEDLIS_SOME_SWITCH", raw)
    assert env_flag("FUSEDLIS_SOME_SWITCH", not expect) is expect


@pytest.mark.parametrize("default", [True, False])
def test_unset_or_empty_is_default(monkeypatch, default):
    monkeypatch.delenv("FUSEDLIS_SOME_SWITCH", raising=False)
    assert env_flag("FUSEDLIS_SOME_SWITCH", default) is default
    monkeypatch.setenv("FUSEDLIS_SOME_SWITCH", "  ")
    assert env_flag("FUSEDLIS_SOME_SWITCH", default) is default


def test_typo_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("FUSEDLIS_SOME_SWITCH", "ture")
    with pytest.raises(ValueError, match="FUSEDLIS_SOME_SWITCH='ture'"):
        env_flag("FUSEDLIS_SOME_SWITCH", True)


def test_switches_of_the_library_use_it(monkeypatch):
    from fusedlis.model.ops import get_ops

    monkeypatch.setenv("FUSEDLIS_FUSE_ROPE", "0")
    assert get_ops("triton").fuse_rope is False
    monkeypatch.setenv("FUSEDLIS_FUSE_ROPE", "maybe")
    with pytest.raises(ValueError, match="FUSEDLIS_FUSE_ROPE"):
        get_ops("triton")
    from fusedlis.tuning import _lookup

    monkeypatch.setenv("FUSEDLIS_TUNING", "nope")
    with pytest.raises(ValueError, match="FUSEDLIS_TUNING"):
        _lookup._load()


@pytest.mark.parametrize("raw,expect", [(None, "auto"), ("", "auto"), ("put", "put"), (" PTR ", "ptr"),
                                        ("auto", "auto")])
def test_fused_transport(monkeypatch, raw, expect):
    from fusedlis.engine import fused_transport

    if raw is None:
        monkeypatch.delenv("FUSEDLIS_FUSED_TRANSPORT", raising=False)
    else:
        monkeypatch.setenv("FUSEDLIS_FUSED_TRANSPORT", raw)
    assert fused_transport() == expect
    monkeypatch.setenv("FUSEDLIS_FUSED_TRANSPORT", "ib")
    with pytest.raises(ValueError, match="FUSEDLIS_FUSED_TRANSPORT='ib'"):
        fused_transport()
