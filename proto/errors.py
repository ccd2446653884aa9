"""kvpool's exceptions: one flat tree, raised at public boundaries.

Every exception is a `KVPoolError`. Invalid arguments and invalid data are also `ValueError`s,
so callers that already catch `ValueError` keep working.
"""


class KVPoolError(Exception):
    """Base class of every error kvpool raises on purpose."""


class CodecError(KVPoolError, ValueError):
    """A codec configuration or an input block the codec cannot encode (shape, dtype, bits)."""


class NonFiniteError(CodecError):
    """An input block holds NaN or infinity; it is rejected, never stored."""


class BlockFormatError(KVPoolError, ValueError):
    """A stored block cannot be decoded: bad magic, bad header field, wrong length."""


class TruncatedBlockError(BlockFormatError):
    """The blob is shorter than its header says: a cut-off transfer or write."""


class UnsupportedVersionError(BlockFormatError):
    """The blob's format version is not one this build of kvpool can read."""


class ChecksumError(BlockFormatError):
    """The blob's checksum does not match its content: the bytes were corrupted."""


class BlockMismatchError(BlockFormatError):
    """An intact block that is not the one asked for: another namespace, key, position or shape."""


class ForgedBlockError(BlockFormatError):
    """A block without a valid MAC under the tenant's secret: not written by the tenant."""


class NamespaceError(KVPoolError, ValueError):
    """A namespace that is incomplete or inconsistent (missing model id, bad sizes)."""


class TokenError(KVPoolError, ValueError):
    """Tokens that cannot be hashed into block keys (not 1-D integers in [0, 2**32))."""


class TierError(KVPoolError):
    """A call to the cache tier failed (shard gone, deadline passed, request refused).

    The client's own `lookup`/`put`/`get` never raise it: a failed put is a dropped save and a
    failed get is a miss. Lower-level calls (`TierClient`) raise it with the gRPC status."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code
