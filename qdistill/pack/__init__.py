"""Real low-bit storage (bit packing, safetensors files) and the layers that run packed weights."""

from qdistill.pack.bits import pack_codes, packed_nbytes, unpack_codes
from qdistill.pack.io import freeze, load, read_header, save
from qdistill.pack.modules import PackedConv2d, PackedEmbedding, PackedLinear, pack_layer

__all__ = [
    "PackedConv2d",
    "PackedEmbedding",
    "PackedLinear",
    "freeze",
    "load",
    "pack_layer",
    "pack_codes",
    "packed_nbytes",
    "read_header",
    "save",
    "unpack_codes",
]
