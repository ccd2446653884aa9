from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    LAYOUT_KV: _ClassVar[Layout]
    LAYOUT_LATENT: _ClassVar[Layout]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
LAYOUT_UNSPECIFIED: Layout
LAYOUT_KV: Layout
LAYOUT_LATENT: Layout
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType

class Namespace(_message.Message):
    __slots__ = ("model", "revision", "layout", "layers", "kv_heads", "head_dim", "dtype", "block_tokens", "codec", "format_version", "tp_rank", "tp_size", "integrity")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    INTEGRITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    revision: str
    layout: Layout
    layers: int
    kv_heads: int
    head_dim: int
    dtype: DType
    block_tokens: int
    codec: str
    format_version: int
    tp_rank: int
    tp_size: int
    integrity: str
    def __init__(self, model: _Optional[str] = ..., revision: _Optional[str] = ..., layout: _Optional[_Union[Layout, str]] = ..., layers: _Optional[int] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., block_tokens: _Optional[int] = ..., codec: _Optional[str] = ..., format_version: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., integrity: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace_id", "keys")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: int
    def __init__(self, present: _Optional[int] = ...) -> None: ...

class BlockInfo(_message.Message):
    __slots__ = ("namespace_id", "key", "chain", "position", "size", "namespace", "parent", "hints")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    HINTS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    key: bytes
    chain: bytes
    position: int
    size: int
    namespace: Namespace
    parent: bytes
    hints: int
    def __init__(self, namespace_id: _Optional[bytes] = ..., key: _Optional[bytes] = ..., chain: _Optional[bytes] = ..., position: _Optional[int] = ..., size: _Optional[int] = ..., namespace: _Optional[_Union[Namespace, _Mapping]] = ..., parent: _Optional[bytes] = ..., hints: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("info", "chunk")
    INFO_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    info: BlockInfo
    chunk: bytes
    def __init__(self, info: _Optional[_Union[BlockInfo, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    def __init__(self, stored: _Optional[bool] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace_id", "key")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    key: bytes
    def __init__(self, namespace_id: _Optional[bytes] = ..., key: _Optional[bytes] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("found", "size", "chunk", "replicas")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    found: bool
    size: int
    chunk: bytes
    replicas: int
    def __init__(self, found: _Optional[bool] = ..., size: _Optional[int] = ..., chunk: _Optional[bytes] = ..., replicas: _Optional[int] = ...) -> None: ...

class BatchGetRequest(_message.Message):
    __slots__ = ("namespace_id", "keys")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class BlockFound(_message.Message):
    __slots__ = ("found", "size", "replicas", "branched")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    BRANCHED_FIELD_NUMBER: _ClassVar[int]
    found: bool
    size: int
    replicas: int
    branched: bool
    def __init__(self, found: _Optional[bool] = ..., size: _Optional[int] = ..., replicas: _Optional[int] = ..., branched: _Optional[bool] = ...) -> None: ...

class BatchGetResponse(_message.Message):
    __slots__ = ("blocks", "data")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockFound]
    data: bytes
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockFound, _Mapping]]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BatchPutRequest(_message.Message):
    __slots__ = ("blocks", "data")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockInfo]
    data: bytes
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockInfo, _Mapping]]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BlockStored(_message.Message):
    __slots__ = ("stored", "code", "detail")
    STORED_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    code: int
    detail: str
    def __init__(self, stored: _Optional[bool] = ..., code: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class BatchPutResponse(_message.Message):
    __slots__ = ("blocks",)
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockStored]
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockStored, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("namespace_id", "keys")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_id", "blocks", "bytes", "budget_bytes", "hits", "misses", "puts", "put_existing", "evictions", "checksum_failures", "rejected", "bytes_served")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    PUT_EXISTING_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SERVED_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    blocks: int
    bytes: int
    budget_bytes: int
    hits: int
    misses: int
    puts: int
    put_existing: int
    evictions: int
    checksum_failures: int
    rejected: int
    bytes_served: int
    def __init__(self, shard_id: _Optional[str] = ..., blocks: _Optional[int] = ..., bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., puts: _Optional[int] = ..., put_existing: _Optional[int] = ..., evictions: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., rejected: _Optional[int] = ..., bytes_served: _Optional[int] = ...) -> None: ...

class TopologyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Shard(_message.Message):
    __slots__ = ("shard_id", "address", "metrics_address")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    address: str
    metrics_address: str
    def __init__(self, shard_id: _Optional[str] = ..., address: _Optional[str] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class TopologyResponse(_message.Message):
    __slots__ = ("epoch", "replication", "shards")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    replication: int
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    def __init__(self, epoch: _Optional[int] = ..., replication: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ...) -> None: ...

class OpenSharedRequest(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...

class OpenSharedResponse(_message.Message):
    __slots__ = ("session", "ticket", "socket_path", "size")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    ticket: bytes
    socket_path: str
    size: int
    def __init__(self, session: _Optional[bytes] = ..., ticket: _Optional[bytes] = ..., socket_path: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class GetSharedRequest(_message.Message):
    __slots__ = ("namespace_id", "key", "session", "offset", "capacity")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    key: bytes
    session: bytes
    offset: int
    capacity: int
    def __init__(self, namespace_id: _Optional[bytes] = ..., key: _Optional[bytes] = ..., session: _Optional[bytes] = ..., offset: _Optional[int] = ..., capacity: _Optional[int] = ...) -> None: ...

class GetSharedResponse(_message.Message):
    __slots__ = ("found", "size", "fits", "replicas")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    found: bool
    size: int
    fits: bool
    replicas: int
    def __init__(self, found: _Optional[bool] = ..., size: _Optional[int] = ..., fits: _Optional[bool] = ..., replicas: _Optional[int] = ...) -> None: ...

class PutSharedRequest(_message.Message):
    __slots__ = ("info", "session", "offset")
    INFO_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    info: BlockInfo
    session: bytes
    offset: int
    def __init__(self, info: _Optional[_Union[BlockInfo, _Mapping]] = ..., session: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class BatchGetSharedRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "offset", "capacity")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    offset: int
    capacity: int
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., offset: _Optional[int] = ..., capacity: _Optional[int] = ...) -> None: ...

class BatchGetSharedResponse(_message.Message):
    __slots__ = ("blocks", "copied")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    COPIED_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockFound]
    copied: int
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockFound, _Mapping]]] = ..., copied: _Optional[int] = ...) -> None: ...

class BatchPutSharedRequest(_message.Message):
    __slots__ = ("blocks", "offset", "touch")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOUCH_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[BlockInfo]
    offset: int
    touch: TouchRequest
    def __init__(self, blocks: _Optional[_Iterable[_Union[BlockInfo, _Mapping]]] = ..., offset: _Optional[int] = ..., touch: _Optional[_Union[TouchRequest, _Mapping]] = ...) -> None: ...

class ProbeSharedRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "offset", "capacity", "touch")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    TOUCH_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    offset: int
    capacity: int
    touch: TouchRequest
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., offset: _Optional[int] = ..., capacity: _Optional[int] = ..., touch: _Optional[_Union[TouchRequest, _Mapping]] = ...) -> None: ...

class TouchRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "branched")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    BRANCHED_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    branched: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., branched: _Optional[_Iterable[bytes]] = ...) -> None: ...

class TouchResponse(_message.Message):
    __slots__ = ("touched",)
    TOUCHED_FIELD_NUMBER: _ClassVar[int]
    touched: int
    def __init__(self, touched: _Optional[int] = ...) -> None: ...

class CloseSharedRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    def __init__(self, session: _Optional[bytes] = ...) -> None: ...

class CloseSharedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ArtifactManifest(_message.Message):
    __slots__ = ("id", "kind", "size", "chunk_bytes", "chunks")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    kind: str
    size: int
    chunk_bytes: int
    chunks: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, id: _Optional[bytes] = ..., kind: _Optional[str] = ..., size: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., chunks: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("id", "index", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    index: int
    data: bytes
    def __init__(self, id: _Optional[bytes] = ..., index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutArtifactRequest(_message.Message):
    __slots__ = ("manifest", "chunk")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    manifest: ArtifactManifest
    chunk: ArtifactChunk
    def __init__(self, manifest: _Optional[_Union[ArtifactManifest, _Mapping]] = ..., chunk: _Optional[_Union[ArtifactChunk, _Mapping]] = ...) -> None: ...

class PutArtifactResponse(_message.Message):
    __slots__ = ("complete", "missing")
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    complete: bool
    missing: int
    def __init__(self, complete: _Optional[bool] = ..., missing: _Optional[int] = ...) -> None: ...

class GetArtifactRequest(_message.Message):
    __slots__ = ("id", "manifest", "index")
    ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    manifest: bool
    index: int
    def __init__(self, id: _Optional[bytes] = ..., manifest: _Optional[bool] = ..., index: _Optional[int] = ...) -> None: ...

class GetArtifactResponse(_message.Message):
    __slots__ = ("found", "manifest", "data")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    found: bool
    manifest: ArtifactManifest
    data: bytes
    def __init__(self, found: _Optional[bool] = ..., manifest: _Optional[_Union[ArtifactManifest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ArtifactRecord(_message.Message):
    __slots__ = ("artifact_id", "version", "codec", "mac")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    artifact_id: bytes
    version: int
    codec: str
    mac: bytes
    def __init__(self, artifact_id: _Optional[bytes] = ..., version: _Optional[int] = ..., codec: _Optional[str] = ..., mac: _Optional[bytes] = ...) -> None: ...

class PutRecordRequest(_message.Message):
    __slots__ = ("name", "record")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    name: bytes
    record: ArtifactRecord
    def __init__(self, name: _Optional[bytes] = ..., record: _Optional[_Union[ArtifactRecord, _Mapping]] = ...) -> None: ...

class PutRecordResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    def __init__(self, stored: _Optional[bool] = ...) -> None: ...

class GetRecordRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: bytes
    def __init__(self, name: _Optional[bytes] = ...) -> None: ...

class GetRecordResponse(_message.Message):
    __slots__ = ("found", "record")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    found: bool
    record: ArtifactRecord
    def __init__(self, found: _Optional[bool] = ..., record: _Optional[_Union[ArtifactRecord, _Mapping]] = ...) -> None: ...
