"""Packet transport between ranks: point-to-point (``p2p``) and compressed collectives."""
from gradwire.comm.collectives import (
    chunk_bounds,
    compressed_all_gather,
    compressed_all_reduce,
    compressed_reduce_scatter,
)
from gradwire.comm.errors import CommError, ConfigMismatchError, PeerTimeoutError
from gradwire.comm.handshake import check_group, check_peer, codec_fingerprint
from gradwire.comm.p2p import PacketChannel, recv_packet, send_packet

__all__ = [
    "CommError", "ConfigMismatchError", "PeerTimeoutError", "PacketChannel", "chunk_bounds",
    "check_group", "check_peer", "codec_fingerprint", "compressed_all_gather",
    "compressed_all_reduce", "compressed_reduce_scatter", "recv_packet", "send_packet",
]
