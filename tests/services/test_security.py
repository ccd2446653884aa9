"""TLS, mutual TLS and per-tenant tokens on a shard's gRPC endpoint, with certificates made
by the test. A tenant can never read or overwrite another tenant's blocks, even knowing keys."""

from __future__ import annotations

import datetime
import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import CodecConfig
from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.keys import block_keys
from kvpool.services.security import ServerSecurity, store_key
from kvpool.services.server import ShardServer
from kvpool.services.store import BlockStore
from kvpool.transport import ClientConfig, channel_credentials

CODEC = CodecConfig(2, 2, 64)
B = 64
NS = namespace_for("test/security", 2, 2, 64, torch.float16, CODEC, block_tokens=B)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def issue(path: Path, cn: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None,
          server: bool = False, ca: bool = False) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:  # fmt: skip
    """A key and certificate under `path`.{key,crt}; self-signed when issuer is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    signer_key, signer_name = (key, _name(cn)) if issuer is None else (issuer[0], issuer[1].subject)
    builder = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(signer_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )  # fmt: skip
    if server:
        san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(signer_key, hashes.SHA256())
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))  # fmt: skip
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca = issue(d / "ca", "kvpool test CA", None, ca=True)
    issue(d / "server", "shard", ca, server=True)
    issue(d / "client", "worker", ca)
    rogue = issue(d / "rogue-ca", "rogue CA", None, ca=True)
    issue(d / "rogue", "intruder", rogue)
    (d / "tokens.json").write_text(json.dumps({"token-a": "tenant-a", "token-b": "tenant-b"}))
    return d


def serve(security: ServerSecurity) -> ShardServer:
    srv = ShardServer(BlockStore(16 << 20), "secure", security=security)
    srv.start()
    return srv


@pytest.fixture(scope="module")
def tls_server(pki) -> Iterator[ShardServer]:
    srv = serve(
        ServerSecurity(
            str(pki / "server.crt"), str(pki / "server.key"), tokens_file=str(pki / "tokens.json")
        )
    )
    yield srv
    srv.stop()


def client(srv: ShardServer, pki: Path, **tls: str | None) -> KVPool:
    config = ClientConfig(timeout_s=3.0, **tls)  # type: ignore[arg-type]
    return KVPool(srv.address, NS, CODEC, config=config)


def kv(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 2, 2 * B, 64, generator=g).half() for _ in range(2))  # type: ignore[return-value]


TOKENS = list(range(1000, 1000 + 2 * B))


def test_tenants_are_isolated_even_knowing_the_keys(tls_server, pki) -> None:
    ca = str(pki / "ca.crt")
    with client(tls_server, pki, tls_ca_file=ca, token="token-a") as a, \
         client(tls_server, pki, tls_ca_file=ca, token="token-b") as b:  # fmt: skip
        ka = kv(1)
        assert a.put(TOKENS, ka) == 2
        keys = block_keys(NS, TOKENS)
        assert all(store_key("tenant-a", NS.id, k) in tls_server.store for k in keys)
        assert not any(store_key("tenant-b", NS.id, k) in tls_server.store for k in keys)
        assert b.lookup(TOKENS) == 0 and b.get(TOKENS) is None  # same namespace, same keys
        assert b.put(TOKENS, kv(2)) == 2  # b's own copy: a's blocks are not overwritten
        got_a, got_b = a.get(TOKENS), b.get(TOKENS)
        assert (
            got_a is not None
            and got_b is not None
            and got_a.keys is not None
            and got_b.keys is not None
        )
        assert (got_a.keys.float() - ka[0].float()).abs().mean() < 0.5
        assert not torch.equal(got_a.keys, got_b.keys)
        assert a.call(a.tier.delete(NS, keys)) == 2  # a deletes only its own
        assert b.lookup(TOKENS) == 2 * B and a.lookup(TOKENS) == 0


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", "token-a"),)]
)
def test_requests_without_a_valid_token_are_unauthenticated(tls_server, pki, metadata) -> None:
    creds = channel_credentials(str(pki / "ca.crt"))
    with grpc.secure_channel(tls_server.address, creds) as ch:
        stub = pb_grpc.KVPoolStub(ch)
        for call in (
            lambda: stub.Lookup(
                pb.LookupRequest(namespace_id=NS.id, keys=[b"k" * 32]), metadata=metadata, timeout=5
            ),
            lambda: stub.Stats(pb.StatsRequest(), metadata=metadata, timeout=5),
            lambda: list(
                stub.Get(
                    pb.GetRequest(namespace_id=NS.id, key=b"k" * 32), metadata=metadata, timeout=5
                )
            ),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_plaintext_client_gets_misses_not_crashes(tls_server) -> None:
    with KVPool(tls_server.address, NS, CODEC, config=ClientConfig(timeout_s=2.0)) as c:
        assert c.lookup(TOKENS) == 0 and c.get(TOKENS) is None
        assert c.stats.lookup_failures >= 1


def test_mutual_tls_needs_a_client_certificate_from_the_ca(pki) -> None:
    srv = serve(
        ServerSecurity(
            str(pki / "server.crt"), str(pki / "server.key"), client_ca_file=str(pki / "ca.crt")
        )
    )
    try:
        ca = str(pki / "ca.crt")
        with client(
            srv,
            pki,
            tls_ca_file=ca,
            tls_cert_file=str(pki / "client.crt"),
            tls_key_file=str(pki / "client.key"),
        ) as ok:
            assert ok.put(TOKENS, kv(3)) == 2 and ok.lookup(TOKENS) == 2 * B
        for cert in (None, "rogue"):
            files = (
                {
                    "tls_cert_file": str(pki / f"{cert}.crt"),
                    "tls_key_file": str(pki / f"{cert}.key"),
                }
                if cert
                else {}
            )
            with client(srv, pki, tls_ca_file=ca, **files) as bad:
                assert bad.lookup(TOKENS) == 0 and bad.stats.lookup_failures == 1
    finally:
        srv.stop()


def test_configurations_that_would_leak_are_refused() -> None:
    with pytest.raises(ValueError):
        ServerSecurity(tokens_file="tokens.json")  # tokens without TLS
    with pytest.raises(ValueError):
        ServerSecurity(cert_file="a.crt")  # a certificate without its key
    with pytest.raises(ValueError):
        ClientConfig(token="t")  # a token over plaintext


def test_a_ray_tier_with_tls_and_tokens(ray_session, pki) -> None:
    from kvpool.services.tier import TierConfig, start_tier

    security = ServerSecurity(
        str(pki / "server.crt"), str(pki / "server.key"), tokens_file=str(pki / "tokens.json")
    )
    tier = start_tier(
        TierConfig(shards=2, budget_bytes=16 << 20, shard_cpus=0.1, name="tls", security=security)
    )
    try:
        config = ClientConfig(timeout_s=5.0, tls_ca_file=str(pki / "ca.crt"), token="token-a")
        with KVPool(tier.endpoint, NS, CODEC, config=config) as c:
            assert c.put(TOKENS, kv(4)) == 2 and c.lookup(TOKENS) == 2 * B
        with KVPool(tier.endpoint, NS, CODEC, config=ClientConfig(timeout_s=2.0)) as plain:
            assert plain.lookup(TOKENS) == 0  # plaintext: refused by the TLS endpoints, a miss
    finally:
        tier.shutdown()


def tokens_security(pki: Path, path: Path, content: str) -> ServerSecurity:
    path.write_text(content)
    return ServerSecurity(str(pki / "server.crt"), str(pki / "server.key"), tokens_file=str(path))


def test_the_tokens_file_gives_tenants_and_their_quotas(pki, tmp_path) -> None:
    old = tokens_security(pki, tmp_path / "old.json", '{"token-a": "a", "token-b": "b"}')
    assert old.tenants() == {"token-a": "a", "token-b": "b"} and old.quotas() == {}
    new = tokens_security(pki, tmp_path / "new.json", json.dumps({
        "token-a": "a",  # the old form still works beside the new one
        "token-b": {"tenant": "b", "quota": 0.25},
        "token-b2": {"tenant": "b"},  # a second token of b: b's quota stands
        "token-b3": {"tenant": "b", "quota": 0.25},
        "token-c": {"tenant": "c", "quota": 1},
    }))  # fmt: skip
    assert new.tenants() == {
        "token-a": "a", "token-b": "b", "token-b2": "b", "token-b3": "b", "token-c": "c"
    }  # fmt: skip
    assert new.quotas() == {"b": 0.25, "c": 1.0}
    assert ServerSecurity().quotas() == {} and ServerSecurity().tenants() is None


@pytest.mark.parametrize(
    "content,why",
    [
        ('["token-a"]', "expected a JSON object"),
        ("{", "not JSON"),
        ('{"token-a": 1}', "entry 1: expected"),
        ('{"": "tenant"}', "entry 1: the token is empty"),
        ('{"token-a": ""}', "entry 1: the tenant is empty"),
        ('{"token-a": "a", "token-b": {"tenant": 5}}', "entry 2: the tenant must be"),
        ('{"token-a": {"quota": 0.5}}', "entry 1: the tenant must be"),
        ('{"token-a": {"tenant": "a", "share": 0.5}}', "entry 1: unknown keys ['share']"),
        ('{"token-a": {"tenant": "a", "quota": 0}}', "entry 1: the quota must be"),
        ('{"token-a": {"tenant": "a", "quota": 1.5}}', "entry 1: the quota must be"),
        ('{"token-a": {"tenant": "a", "quota": -0.5}}', "entry 1: the quota must be"),
        ('{"token-a": {"tenant": "a", "quota": "0.5"}}', "entry 1: the quota must be"),
        ('{"token-a": {"tenant": "a", "quota": true}}', "entry 1: the quota must be"),
        ('{"token-a": {"tenant": "a", "quota": null}}', "entry 1: the quota must be"),
        ('{"token-a": {"tenant": "a", "quota": NaN}}', "entry 1: the quota must be"),
        (
            '{"token-a": {"tenant": "a", "quota": 0.5}, "token-b": {"tenant": "a", "quota": 0.25}}',
            "entry 2: tenant 'a' has quota 0.25 here and 0.5",
        ),
    ],
)
def test_a_malformed_tokens_file_is_refused(pki, tmp_path, content, why) -> None:
    path = tmp_path / "tokens.json"
    security = tokens_security(pki, path, content)
    for read in (security.tenants, security.quotas):
        with pytest.raises(ValueError) as e:
            read()
        message = str(e.value)
        assert message.startswith(f"{path}: ") and why in message
        assert "token-a" not in message and "token-b" not in message  # secrets stay out of logs
