"""Key-encryption keys: start-up checks (refuse, change nothing), and online rotation."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshgate.api.v1 import keys_pb2
from meshgate.common.testing import ServiceProcess
from meshgate.keyservice.core import KeyServiceCore
from meshgate.keyservice.sealing import KekError, Keyring, SealError, split
from meshgate.keyservice.vault import SEALED


async def populate(core: KeyServiceCore, put_network, secrets) -> list:
    await put_network("prod")
    psks = await core.psk.issue("networks/prod", [f"networks/prod/nodes/hub|networks/prod/nodes/s{i}"
                                                  for i in range(300)])
    pair = await core.clients.issue("networks/prod/externalClients/phone")
    secrets += [p.key for p in psks] + [base64.b64decode(pair.private_key)]
    return psks


async def sealed_values(etcd) -> dict[bytes, bytes]:
    raw = await etcd.dump()
    prefixes = [etcd.prefix + b"/" + p.encode() for p in SEALED]
    return {k: v for k, v in raw.items() if any(k.startswith(p) for p in prefixes)}


async def test_fresh_store_initialised_then_checked(etcd, keks):
    keks.new("k1"), keks.new("k2")
    a = KeyServiceCore(etcd, keks.ring("k1"), scheduler=False)
    await a.start()
    await a.stop()
    assert (await etcd.get(etcd.key("keys", "kek", "active"))).value == b"k1"
    before = await etcd.dump()
    # Same KEK: fine. Holding k1 among others: fine (the store says which one is active).
    for ring in (keks.ring("k1"), keks.ring("k2", "k1")):
        c = KeyServiceCore(etcd, ring, scheduler=False)
        await c.start()
        await c.stop()
    # Another KEK, or the right id with the wrong bytes: refused, nothing changed.
    with pytest.raises(KekError, match="'k1', which is not configured"):
        await KeyServiceCore(etcd, keks.ring("k2"), scheduler=False).start()
    wrong = Keyring([("k1", os.urandom(32))])
    with pytest.raises(KekError, match="not the one the stored secrets were encrypted with"):
        await KeyServiceCore(etcd, wrong, scheduler=False).start()
    assert await etcd.dump() == before


def test_process_refuses_to_start_without_the_right_kek(etcd_server, etcd_prefix, keks, kek_env, tmp_path):
    keks.new("k1"), keks.new("k2")
    args = ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix, "--insecure"]
    ok = ServiceProcess("meshgate-keyservice", args, env=kek_env("k1", path=str(tmp_path / "kek"))).start()
    assert ok.stop() == 0, ok.log()
    exe = os.path.join(os.path.dirname(sys.executable), "meshgate-keyservice")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHGATE_KEYSERVICE_")}
    cases = [
        ({}, "no key-encryption key configured"),
        (kek_env("k2"), "encrypted under key-encryption key 'k1', which is not configured"),
        ({"MESHGATE_KEYSERVICE_KEK": "k1:" + base64.b64encode(os.urandom(32)).decode()}, "is not the one"),
        ({"MESHGATE_KEYSERVICE_KEK_FILE": str(tmp_path / "missing")}, "cannot read the KEK file"),
        ({"MESHGATE_KEYSERVICE_KEK": "k1:short"}, "not valid base64"),
    ]
    for extra, message in cases:
        r = subprocess.run([exe, "--listen", "127.0.0.1:0", *args], env={**env, **extra},
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0, r.stderr
        assert message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        for secret in keks.made.values():
            assert base64.b64encode(secret).decode() not in r.stderr + r.stdout


async def test_kek_rotation_online(etcd, keks, put_network, secrets, tmp_path):
    keks.new("k1"), keks.new("k2")
    kek_file = tmp_path / "kek"
    kek_file.write_text(keks.line("k1") + "\n")
    # Replica A reads its KEKs from a file; B is configured with both already.
    a = KeyServiceCore(etcd, Keyring.from_config(str(kek_file), ""), scheduler=False)
    b = KeyServiceCore(etcd, keks.ring("k1", "k2"), scheduler=False)
    await a.start()
    await b.start()
    try:
        psks = await populate(a, put_network, secrets)
        authority = await a.authority.public_keys()
        # The operator adds k2 to A's file; the rotation runs on B while A keeps issuing.
        kek_file.write_text(keks.line("k1") + "\n" + keks.line("k2") + "\n")
        more_pairs = [f"networks/prod/nodes/x{i}|networks/prod/nodes/y{i}" for i in range(200)]

        async def keep_issuing():
            out = []
            for i in range(0, 200, 20):
                out += await a.psk.issue("networks/prod", more_pairs[i : i + 20])
            return out

        rewrapped, issued = await asyncio.gather(b.vault.rotate_kek("k2"), keep_issuing())
        secrets += [p.key for p in issued]
        assert rewrapped >= 300 + 1 + 1 + 1  # PSKs, client key, authority, CA (and some issued meanwhile)
        assert (await etcd.get(etcd.key("keys", "kek", "active"))).value == b"k2"
        # Every secret is still what it was, read through either replica.
        for core in (a, b):
            again = await core.psk.issue("networks/prod", [p.peers[0] + "|" + p.peers[1] for p in psks])
            assert [p.key for p in again] == [p.key for p in psks]
            assert [p.key for p in await core.psk.issue("networks/prod", more_pairs)] == [p.key for p in issued]
            assert await core.authority.public_keys() == authority
        # Nothing in the store is sealed under k1 any more, and k1 decrypts nothing.
        values = await sealed_values(etcd)
        assert values and all(split(v)[1]["kek"] == "k2" for v in values.values())
        old = AESGCM(keks.made["k1"])
        for value in (await etcd.dump()).values():
            try:
                _, _, nonce, ct = split(value)
            except SealError:
                continue
            for ad in (b"", None):
                with pytest.raises(InvalidTag):
                    old.decrypt(nonce, ct, ad)
        only_old = keks.ring("k1")
        for key, value in values.items():
            with pytest.raises(KekError):
                only_old.open(key[len(etcd.prefix) + 1 :].decode(), value)
        assert await etcd.get(etcd.key("keys", "kek", "check", "k1")) is None
        # A replica holding only the old KEK can no longer start; one with only the new one can.
        with pytest.raises(KekError, match="'k2', which is not configured"):
            await KeyServiceCore(etcd, keks.ring("k1"), scheduler=False).start()
        c = KeyServiceCore(etcd, keks.ring("k2"), scheduler=False)
        await c.start()
        assert [p.key for p in await c.psk.issue("networks/prod", more_pairs)] == [p.key for p in issued]
        await c.stop()
        # Idempotent: rotating to the active KEK again re-wraps nothing.
        assert await a.vault.rotate_kek("k2") == 0
    finally:
        await a.stop()
        await b.stop()


async def test_rotate_rpc_refuses_unknown_kek(ks, put_network, secrets):
    import grpc

    before = await ks.etcd.dump()
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await ks.stub.RotateKeyEncryptionKey(keys_pb2.RotateKeyEncryptionKeyRequest(new_key_id="k9"))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'k9'" in ei.value.details()
    assert await ks.etcd.dump() == before


async def test_rotate_rpc(ks, keks, put_network, secrets):
    await populate(ks.core, put_network, secrets)
    keks.new("k2")
    ks.core.vault.keyring = keks.ring("k1", "k2")
    r = await ks.stub.RotateKeyEncryptionKey(keys_pb2.RotateKeyEncryptionKeyRequest(new_key_id="k2"))
    assert r.rewrapped == 300 + 1 + 1 + 1
    # The replica keeps working under the new KEK.
    await ks.core.clients.issue("networks/prod/externalClients/laptop")
