"""Build codecs from configuration: ``build_codec({"name": "fp", "bits": 6})`` or
``build_codec("fp", bits=6)``.

Every codec class takes its configuration as keyword arguments to ``__init__`` and reports it
back from ``config()``, so ``build_codec(codec.config())`` rebuilds an equal codec. Unknown names
and unknown keys are errors that list what is accepted (a typo in a DeepSpeed JSON must not
silently fall back to a default).
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch

from gradwire.codec.base import Codec
from gradwire.codec.header import PacketError, parse_packet


def _classes() -> dict[str, type[Codec]]:
    # Imported here so that importing the registry never pulls the numerics (scipy) eagerly.
    from gradwire.codec.baselines import BF16Codec, FP8E4M3Codec, FP8E5M2Codec, IdentityCodec
    from gradwire.codec.fp import FPCodec
    from gradwire.codec.nm import NMCodec
    from gradwire.codec.prune import PruneCodec

    classes = [IdentityCodec, BF16Codec, FP8E4M3Codec, FP8E5M2Codec, FPCodec, PruneCodec, NMCodec]
    out = {c.name: c for c in classes}
    ids = [c.codec_id for c in classes]
    assert len(set(ids)) == len(ids), "codec ids must be unique"
    return out


def codec_names() -> list[str]:
    """Registered codec names."""
    return sorted(_classes())


def _accepted(cls: type[Codec]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p != "self"]


def build_codec(config: Mapping[str, Any] | str, **params: Any) -> Codec:
    """A codec from ``{"name": ..., **params}`` or from ``name, **params``.

    Raises ``ValueError`` naming an unknown codec (and the known ones) or unknown keys (and the
    accepted ones); the codec's own constructor validates the values.
    """
    if isinstance(config, str):
        name, kwargs = config, dict(params)
    elif isinstance(config, Mapping):
        if params:
            raise TypeError("pass either a config mapping or a name with keyword parameters, not both")
        if "name" not in config:
            raise ValueError(f"codec config needs a 'name' key, got keys {sorted(config)}")
        kwargs = {k: v for k, v in config.items() if k != "name"}
        name = config["name"]
    else:
        raise TypeError(f"codec config must be a mapping or a name, got {type(config).__name__}")
    classes = _classes()
    if name not in classes:
        raise ValueError(f"unknown codec {name!r}; known codecs: {sorted(classes)}")
    cls = classes[name]
    accepted = _accepted(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"codec {name!r}: unknown parameter(s) {unknown}; accepted: {accepted}")
    return cls(**kwargs)


def as_codec(codec: Codec | Mapping[str, Any]) -> Codec:
    """``codec`` itself, or the codec a config mapping describes: every integration accepts both
    (a Codec object from Python, a mapping from a JSON config)."""
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, Mapping):
        return build_codec(codec)
    raise TypeError(f"codec must be a Codec or a codec config mapping, got {type(codec).__name__}")


def codec_class_for_packet(packet: torch.Tensor) -> type[Codec]:
    """The codec class that wrote ``packet`` (header validated, checksums included)."""
    header, _ = parse_packet(packet)
    for cls in _classes().values():
        if cls.codec_id == header.codec_id:
            return cls
    raise PacketError(f"codec_id: no registered codec has id {header.codec_id}")
