"""Wire codecs: tensor -> self-describing uint8 packet -> tensor (see docs/architecture.md).

``build_codec({"name": "fp", "bits": 6})`` builds any registered codec; ``PacketError`` is what
decoding raises on a malformed, corrupted or mismatched packet.
"""
from gradwire.codec.base import Codec, EncodeResult
from gradwire.codec.baselines import BF16Codec, FP8E4M3Codec, FP8E5M2Codec, IdentityCodec
from gradwire.codec.fp import FPCodec
from gradwire.codec.header import Expected, PacketError
from gradwire.codec.nm import NMCodec
from gradwire.codec.prune import PruneCodec
from gradwire.codec.registry import build_codec, codec_class_for_packet, codec_names

__all__ = [
    "Codec", "EncodeResult", "Expected", "PacketError", "build_codec", "codec_names", "codec_class_for_packet",
    "IdentityCodec", "BF16Codec", "FP8E4M3Codec", "FP8E5M2Codec", "FPCodec", "PruneCodec", "NMCodec",
]
