"""Every integration takes a Codec or a codec config mapping (issue 15, item 6)."""
import pytest

from gradwire.codec.registry import as_codec, build_codec
from gradwire.integrations.ddp import GradwireDDPState
from gradwire.integrations.tensor_parallel import TPComm


def test_as_codec_accepts_a_codec_or_a_mapping():
    c = build_codec({"name": "fp", "bits": 6})
    assert as_codec(c) is c
    assert as_codec({"name": "fp", "bits": 6}).config() == c.config()
    with pytest.raises(TypeError, match="Codec or a codec config mapping"):
        as_codec("fp")
    with pytest.raises(ValueError, match="unknown codec"):
        as_codec({"name": "nope"})


def test_integration_states_take_mappings():
    assert TPComm({"name": "bf16"}).codec.name == "bf16"
    assert GradwireDDPState({"name": "nm", "n": 2, "m": 4, "dim": None}).codec.dim is None
    with pytest.raises(TypeError, match="Codec or a codec config mapping"):
        TPComm(3)
