"""kvpool: a distributed store for compressed LLM attention KV caches.

The package is assembled from the repository's top-level folders: `kvpool` (client/),
`kvpool.kernels` (the codec), `kvpool.services` (the cache tier) and `kvpool.proto` (wire
messages). Importing `kvpool` itself is cheap and does not import torch: the cache tier only
handles opaque bytes.
"""

from kvpool.proto.errors import (
    BlockFormatError,
    ChecksumError,
    CodecError,
    KVPoolError,
    NonFiniteError,
    TruncatedBlockError,
    UnsupportedVersionError,
)

__version__ = "0.1.0"

__all__ = [
    "BlockFormatError",
    "ChecksumError",
    "CodecError",
    "KVPoolError",
    "NonFiniteError",
    "TruncatedBlockError",
    "UnsupportedVersionError",
    "__version__",
]
