"""Transport security and tenant authentication for the shards' gRPC endpoints.

Where it stands: at the edge of every shard (services/server.py); the client's side of TLS
and tokens is in client/transport.py.
- TLS with a server certificate; mutual TLS when a client CA is given (clients then present
  certificates signed by it).
- Token authentication per tenant: a request carries `authorization: Bearer <token>` (sent by
  the client as gRPC call credentials, so only over TLS); the shard maps the token to its
  tenant and answers UNAUTHENTICATED otherwise. Blocks are stored under keys scoped by tenant
  and namespace (`store_key`), so a tenant can never read, overwrite or shadow another
  tenant's blocks, even knowing their keys.
- Tenant quotas: the tokens file may give a tenant its share of each shard's budget
  (`{"<token>": {"tenant": "<tenant>", "quota": 0.25}}`); the shard's BlockStore keeps the
  tenant within it (`quotas`, and `kvpool serve --tenant-quota` for the default share).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class ServerSecurity:
    cert_file: str | None = None  # PEM server certificate (chain)
    key_file: str | None = None
    client_ca_file: str | None = None  # set: mutual TLS, clients must present a certificate
    # JSON {"<token>": "<tenant>" | {"tenant": "<tenant>", "quota": share}}; needs TLS
    tokens_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS needs both a certificate and its key")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("mutual TLS needs a server certificate too")
        if self.tokens_file and not self.cert_file:
            raise ValueError("token authentication needs TLS (tokens never travel in clear)")

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    def credentials(self) -> grpc.ServerCredentials:
        assert self.cert_file and self.key_file
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        pair = (Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())
        return grpc.ssl_server_credentials(
            [pair], root_certificates=ca, require_client_auth=ca is not None
        )

    def tenants(self) -> Mapping[str, str] | None:
        """token -> tenant, or None when authentication is off."""
        if not self.tokens_file:
            return None
        return read_tokens(self.tokens_file)[0]

    def quotas(self) -> dict[str, float]:
        """tenant -> its share (0, 1] of each shard's budget, for the tenants whose tokens
        give one; empty when authentication is off."""
        if not self.tokens_file:
            return {}
        return read_tokens(self.tokens_file)[1]


def read_tokens(path: str) -> tuple[dict[str, str], dict[str, float]]:
    """(token -> tenant, tenant -> quota) from the JSON tokens file at `path`. Each entry is
    `"token": "tenant"` or `"token": {"tenant": "tenant", "quota": share}` (quota optional, in
    (0, 1]); a tenant's tokens that give a quota must give the same one. ValueError naming the
    file and the entry otherwise (by its place in the file, never its token: errors end up in
    logs)."""
    try:
        entries = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected a JSON object of token -> tenant")
    tenants: dict[str, str] = {}
    quotas: dict[str, float] = {}
    for i, (token, entry) in enumerate(entries.items(), 1):
        where = f"{path}: entry {i}"
        tenant, quota = _entry(where, token, entry)
        if quota is not None and quotas.setdefault(tenant, quota) != quota:
            raise ValueError(
                f"{where}: tenant {tenant!r} has quota {quota} here and {quotas[tenant]} on "
                "another of its tokens"
            )
        tenants[token] = tenant
    return tenants, quotas


def _entry(where: str, token: str, entry: object) -> tuple[str, float | None]:
    """(tenant, quota or None) of one tokens-file entry; ValueError saying what is wrong."""

    def bad(why: str) -> ValueError:
        return ValueError(f"{where}: {why}, got {json.dumps(entry)}")

    if not token:
        raise bad("the token is empty")
    if isinstance(entry, str):
        if not entry:
            raise bad("the tenant is empty")
        return entry, None
    if not isinstance(entry, dict):
        raise bad('expected "tenant" or {"tenant": "name", "quota": share}')
    unknown = sorted(set(entry) - {"tenant", "quota"})
    if unknown:
        raise bad(f"unknown keys {unknown} (known: tenant, quota)")
    tenant = entry.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise bad("the tenant must be a non-empty string")
    if "quota" not in entry:
        return tenant, None
    quota = entry["quota"]
    if isinstance(quota, bool) or not isinstance(quota, int | float) or not 0.0 < quota <= 1.0:
        raise bad("the quota must be a number in (0, 1]")
    return tenant, float(quota)


def tenant_of(
    tokens: Mapping[str, str], metadata: tuple[tuple[str, str | bytes], ...]
) -> str | None:
    """The tenant whose token the request carries; None if it carries no valid token."""
    auth = next((v for k, v in metadata if k == "authorization"), None)
    if not isinstance(auth, str) or not auth.startswith("Bearer "):
        return None
    given = auth[len("Bearer ") :].encode()
    found = None
    for token, tenant in tokens.items():  # compare every token in constant time
        if hmac.compare_digest(given, token.encode()):
            found = tenant
    return found


def store_key(tenant: str | None, namespace_id: bytes, key: bytes) -> bytes:
    """The key a block (or a chain) is stored under: it commits to the caller's tenant (None
    when authentication is off), the namespace id and the client's key, so two tenants or two
    namespaces never meet in a shard's store or its Redis tier, even with the same keys."""
    h = _store_prefix(tenant, namespace_id).copy()
    h.update(key)
    return h.digest()


@functools.lru_cache(maxsize=1024)
def _store_prefix(tenant: str | None, namespace_id: bytes) -> Any:
    """sha256 over what every store key of (tenant, namespace id) starts with, to be copied."""
    who = b"" if tenant is None else b"\x01" + tenant.encode()
    h = hashlib.sha256(b"kvpool store\x00")
    h.update(len(who).to_bytes(4, "little") + who)
    h.update(namespace_id)
    return h
