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
