"""N:M at DeepSpeed boundaries (issue 15, item 5): the codec the engine builds from the
"gradwire" section blocks the flattened gradient, so a conv feature map whose last dimension is
not a multiple of M crosses (before: ValueError at the first backward send)."""
import pytest
import torch

pytest.importorskip("deepspeed")

from gradwire.config import parse_gradwire  # noqa: E402
from gradwire.integrations.deepspeed import codec_from_spec  # noqa: E402
from gradwire.numerics import nm  # noqa: E402


@pytest.mark.parametrize("section,dense", [({"name": "nm", "n": 2, "m": 4}, nm.mvue_24_exact),
                                           ({"name": "nm", "n": 1, "m": 2}, nm.mvue_12)])
def test_engine_nm_codec_carries_conv_feature_maps(section, dense):
    codec = codec_from_spec(parse_gradwire({"codec": section}).codec)
    x = torch.randn(1, 384, 2, 3, generator=torch.Generator().manual_seed(0))  # numel 2304, last dim 3
    p = codec.encode(x, seed=4)
    assert p.numel() == codec.packed_size(x.shape, x.dtype)
    want = dense(x.reshape(-1), seed=4).reshape(x.shape)  # 2304 % 4 == 0: no padding here
    torch.testing.assert_close(codec.decode(p), want, rtol=0, atol=0)
    y = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(1))  # 15 elements: padded tail
    assert codec.decode(codec.encode(y, seed=1)).shape == y.shape
