"""External clients through the control plane: against a real key service
process and real etcd (the `keyed` fixture), and without a key service (`cp`).

What a user sees: the create call returns a wg-quick configuration once; the
client becomes a signed peer of its gateway node, which relays for it, and the
nodes that peer with the gateway route its address there; disable, delete and
forced node deletes undo exactly that."""

from __future__ import annotations

import asyncio
import base64
import configparser
import ipaddress

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from google.protobuf import field_mask_pb2

from cptest import SimAgent, details, make_key, make_network, make_node, state_dump, wait_until
from meshgate.api.v1 import (
    external_client_pb2 as ec,
)
from meshgate.api.v1 import (
    external_client_pb2_grpc,
    keys_pb2,
    node_pb2,
)
from meshgate.common import signing
from test_keys_integration import KS, enrolled, keyed  # noqa: F401,F811 - keyed is the fixture

PHONE = "networks/prod/externalClients/phone"


def parse_config(text: str) -> dict[str, dict[str, str]]:
    cp = configparser.ConfigParser()
    cp.optionxform = str  # keep key case
    cp.read_string(text)
    return {s: dict(cp[s]) for s in cp.sections()}


async def create(stub, client_id="phone", gateway="a", guard=None, **kw) -> ec.ExternalClient:
    """Create a client; with the `secret_guard`, register its private key and
    pre-shared key, which no log, span or etcd value may then contain."""
    c = await stub.CreateExternalClient(ec.CreateExternalClientRequest(
        parent="networks/prod", external_client_id=client_id,
        external_client=ec.ExternalClient(gateway_node=f"networks/prod/nodes/{gateway}", **kw)))
    if guard is not None:
        conf = parse_config(c.config)
        guard.add(base64.b64decode(conf["Interface"]["PrivateKey"]))
        if "PresharedKey" in conf["Peer"]:
            guard.add(base64.b64decode(conf["Peer"]["PresharedKey"]))
        guard.add(c.config)
    return c


def peer(agent, resource):
    return next((p for p in agent.state.peers if p.resource == resource), None)


async def agents(cp, n=2):
    """`n` enrolled, connected agents (closed by the `keyed` fixture)."""
    # The key service's spans must reach the guard for it to search them.
    cp.guard.expect_span(KS + "IssueClientKeyPair", "meshgate-keyservice")
    cp.guard.expect_span("/meshgate.api.v1.ExternalClientService/CreateExternalClient", "in-process")
    await make_network(cp, ipv6_cidr="fd00:64::/64")
    ek = await make_key(cp)
    cp.guard.add_token(ek.secret)
    out = []
    for i, name in enumerate("abc"[:n]):
        out.append(await (await enrolled(cp, SimAgent(cp.agents, ek.secret, name, f"192.0.2.{i + 1}:51820"))).connect())
    await wait_until(lambda: all(x.state is not None and len(x.state.peers) == n - 1 for x in out), "agents peer")
    return out


def secret_forms(secret: bytes) -> list[bytes]:
    return [secret, base64.b64encode(secret), base64.urlsafe_b64encode(secret), secret.hex().encode()]


async def config_state(etcd) -> dict[bytes, bytes]:
    """The keyspace without what connected agents keep writing (acks, sessions)."""
    return {k: v for k, v in (await state_dump(etcd)).items() if b"/status/" not in k and b"/sessions/" not in k}


async def assert_not_stored(etcd, *secrets: bytes) -> None:
    raw = b"\n".join(k + b"=" + v for k, v in (await etcd.dump()).items())
    for s in secrets:
        for form in secret_forms(s):
            assert form not in raw


async def test_create_returns_config_once_and_client_peers_its_gateway(keyed):
    cp = keyed
    a, b = await agents(cp)
    c = await create(cp.clients, guard=cp.guard, dns_servers=["192.0.2.53"], display_name="Ann's phone")
    conf = parse_config(c.config)
    private = base64.b64decode(conf["Interface"]["PrivateKey"])
    psk = conf["Peer"]["PresharedKey"]
    # The private key matches the public key the record keeps.
    derived = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    assert base64.b64encode(derived).decode() == c.public_key
    assert conf["Interface"]["Address"] == f"{c.ipv4_address}/32, {c.ipv6_address}/128"
    assert conf["Interface"]["DNS"] == "192.0.2.53"
    assert conf["Peer"]["PublicKey"] == a.public_key and conf["Peer"]["Endpoint"] == "192.0.2.1:51820"
    assert conf["Peer"]["AllowedIPs"] == "100.64.0.0/24, fd00:64::/64"
    assert int(conf["Peer"]["PersistentKeepalive"]) > 0
    # Its addresses come from the network's pool, apart from the nodes'.
    assert ipaddress.ip_address(c.ipv4_address) in ipaddress.ip_network("100.64.0.0/24")
    assert c.ipv4_address not in {a.node.ipv4_address, b.node.ipv4_address}
    # The config is returned once: never by Get or List, never stored.
    got = await cp.clients.GetExternalClient(ec.GetExternalClientRequest(name=PHONE))
    assert got.config == "" and got.public_key == c.public_key and got.etag == c.etag
    listed = await cp.clients.ListExternalClients(ec.ListExternalClientsRequest(parent="networks/prod"))
    assert [x.name for x in listed.external_clients] == [PHONE] and listed.external_clients[0].config == ""
    await assert_not_stored(cp.etcd, private, base64.b64decode(psk))
    # The gateway node gets the client as a signed peer with the same PSK, and relays for it.
    await wait_until(lambda: peer(a, PHONE) is not None and peer(a, PHONE).public_key_signature, "a peers phone")
    pc = peer(a, PHONE)
    assert signing.verify_any(a.authority, PHONE, pc.public_key, pc.public_key_signature)
    assert pc.public_key == c.public_key and pc.preshared_key == psk and pc.endpoint == ""
    host_routes = [f"{c.ipv4_address}/32", f"{c.ipv6_address}/128"]
    assert list(pc.allowed_ips) == host_routes and list(a.state.relayed_ranges) == host_routes
    # The other node routes the client's addresses to the gateway node, and does not peer with the client.
    await wait_until(lambda: f"{c.ipv4_address}/32" in peer(b, a.node.name).allowed_ips, "b routes phone via a")
    assert peer(b, PHONE) is None and not b.state.relayed_ranges

    # Disabled: gone from the gateway's peers and from b's routes; enabled: back.
    mask = field_mask_pb2.FieldMask(paths=["disabled"])
    await cp.clients.UpdateExternalClient(ec.UpdateExternalClientRequest(
        external_client=ec.ExternalClient(name=PHONE, disabled=True), update_mask=mask))
    await wait_until(lambda: peer(a, PHONE) is None and not a.state.relayed_ranges, "phone disabled on a")
    await wait_until(lambda: f"{c.ipv4_address}/32" not in peer(b, a.node.name).allowed_ips, "b drops the route")
    await cp.clients.UpdateExternalClient(ec.UpdateExternalClientRequest(
        external_client=ec.ExternalClient(name=PHONE, disabled=False), update_mask=mask))
    await wait_until(lambda: peer(a, PHONE) is not None and peer(a, PHONE).preshared_key == psk, "phone back")

    # Deleted: off the gateway, and nothing of it left in etcd.
    await cp.clients.DeleteExternalClient(ec.DeleteExternalClientRequest(name=PHONE))
    await wait_until(lambda: peer(a, PHONE) is None and not a.state.relayed_ranges, "phone deleted from a")
    left = [k for k in await state_dump(cp.etcd) if b"phone" in k or c.ipv4_address.encode() in k]
    assert left == []
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await cp.clients.GetExternalClient(ec.GetExternalClientRequest(name=PHONE))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    # Its address is free again.
    again = await create(cp.clients, guard=cp.guard, client_id="laptop")
    assert again.ipv4_address == c.ipv4_address


async def test_named_psk_rotation_reaches_the_gateway_and_network_rotation_skips_the_client(keyed):
    cp = keyed
    a, b = await agents(cp)
    c = await create(cp.clients, guard=cp.guard)
    psk = parse_config(c.config)["Peer"]["PresharedKey"]
    await wait_until(lambda: peer(a, PHONE) is not None and peer(a, PHONE).preshared_key == psk, "phone on a")
    node_psk = peer(a, b.node.name).preshared_key
    await cp.ks.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(network="networks/prod"))
    await wait_until(lambda: peer(a, b.node.name).preshared_key != node_psk, "node pair rotated")
    assert peer(a, PHONE).preshared_key == psk  # the client's static config still works
    await cp.ks.RotatePresharedKeys(keys_pb2.RotatePresharedKeysRequest(
        network="networks/prod", pairs=[f"{a.node.name}|{PHONE}"]))
    await wait_until(lambda: peer(a, PHONE).preshared_key not in ("", psk), "client pair rotated by name")


async def test_forged_client_written_into_etcd_is_unsigned(keyed):
    cp = keyed
    a, b = await agents(cp)
    forged_key = base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    forged = ec.ExternalClient(name="networks/prod/externalClients/evil", gateway_node=a.node.name,
                               ipv4_address="100.64.0.200", public_key=forged_key)
    await cp.etcd.put(cp.etcd.key("externalClients", "prod", "evil"), forged.SerializeToString())
    await wait_until(lambda: peer(a, forged.name) is not None, "a is sent the forged client")
    p = peer(a, forged.name)
    assert p.public_key_signature == b""
    assert not signing.verify_any(a.authority, p.resource, p.public_key, p.public_key_signature)
    # A real client's signature does not verify for another name either.
    real = await create(cp.clients, guard=cp.guard)
    sig = await cp.etcd.get(cp.etcd.key("keys", "clientKeys", "prod", "phone"))
    signed = keys_pb2.SignedNodeKey.FromString(sig.value)
    assert signing.verify_any(a.authority, PHONE, real.public_key, signed.signature)
    assert not signing.verify_any(a.authority, forged.name, real.public_key, signed.signature)


async def test_node_delete_refused_while_it_serves_clients_and_forced_removes_them(keyed):
    cp = keyed
    a, b = await agents(cp)
    await create(cp.clients, guard=cp.guard)
    await create(cp.clients, guard=cp.guard, client_id="laptop", gateway="b")
    before = await config_state(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name=a.node.name))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert details(ei.value)[1] == "RESOURCE_IN_USE" and PHONE in ei.value.details()
    assert await config_state(cp.etcd) == before
    await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name=a.node.name, force=True))
    keys = list(await state_dump(cp.etcd))
    assert [k for k in keys if b"phone" in k] == []

    async def none_of_a_left():
        # (the agent's live session record is bound to its stream's lease; an
        # ack of a's in flight is deleted again by the status writer's next flush)
        left = list(await state_dump(cp.etcd))
        return [k for k in left if (k.endswith(b"/prod/a") and b"/sessions/" not in k) or b"/psk/prod/a." in k] == []

    try:
        await wait_until(none_of_a_left, "nothing of node a left in etcd", timeout=5)
    except AssertionError:
        left = [k for k in await state_dump(cp.etcd) if (k.endswith(b"/prod/a") and b"/sessions/" not in k) or b"/psk/prod/a." in k]
        raise AssertionError(f"left: {left}") from None
    assert any(k.endswith(b"externalClients/prod/laptop") for k in keys)


async def test_abandoned_key_material_is_cleared_only_when_stale(keyed):
    cp = keyed
    a, b = await agents(cp)
    # A create that crashed after the key service issued the pair.
    orphan = await cp.ks_as_cp.IssueClientKeyPair(keys_pb2.IssueClientKeyPairRequest(external_client=PHONE))
    cp.guard.add(base64.b64decode(orphan.private_key))
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await create(cp.clients, guard=cp.guard)  # too fresh to tell from a create in flight
    assert ei.value.code() == grpc.StatusCode.ABORTED and "did not finish" in ei.value.details()
    assert await cp.etcd.get(cp.etcd.key("externalClients", "prod", "phone")) is None
    sig_key = cp.etcd.key("keys", "clientKeys", "prod", "phone")
    signed = keys_pb2.SignedNodeKey.FromString((await cp.etcd.get(sig_key)).value)
    signed.sign_time.seconds -= 3600
    await cp.etcd.put(sig_key, signed.SerializeToString())
    c = await create(cp.clients, guard=cp.guard)
    assert c.public_key != signed.public_key
    now = keys_pb2.SignedNodeKey.FromString((await cp.etcd.get(sig_key)).value)
    assert now.public_key == c.public_key


BAD = [
    ("bad id", dict(client_id="Phone!"), "external_client_id"),
    ("no gateway", dict(gateway=None), "external_client.gateway_node"),
    ("gateway elsewhere", dict(gateway_node="networks/other/nodes/a"), "external_client.gateway_node"),
    ("bad range", dict(allowed_ranges=["10.0.0.1/8"]), "external_client.allowed_ranges[0]"),
    ("range twice", dict(allowed_ranges=["192.0.2.0/24", "192.0.2.0/24"]), "external_client.allowed_ranges[1]"),
    ("bad dns", dict(dns_servers=["dns.example"]), "external_client.dns_servers[0]"),
    ("dns scope id", dict(dns_servers=["192.0.2.53", "fe80::1%$(id) x"]), "external_client.dns_servers[1]"),
    ("long name", dict(display_name="x" * 200), "external_client.display_name"),
]


@pytest.mark.parametrize("case,kw,field", BAD, ids=[b[0] for b in BAD])
async def test_bad_input_is_refused_and_changes_nothing(keyed, case, kw, field):
    cp = keyed
    await make_network(cp)
    await make_node(cp, node_id="a", endpoint="192.0.2.1:51820", public_key=base64.b64encode(bytes(range(32))).decode())
    before = await state_dump(cp.etcd)
    kw = dict(kw)
    client_id = kw.pop("client_id", "phone")
    gateway_node = kw.pop("gateway_node", None)
    gw = kw.pop("gateway", "a")
    req = ec.CreateExternalClientRequest(
        parent="networks/prod", external_client_id=client_id,
        external_client=ec.ExternalClient(
            gateway_node=gateway_node or (f"networks/prod/nodes/{gw}" if gw else ""), **kw))
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await cp.clients.CreateExternalClient(req)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details(ei.value)[0]
    assert await state_dump(cp.etcd) == before


async def test_refusals_that_need_the_store_change_nothing(keyed):
    cp = keyed
    await make_network(cp)
    await make_node(cp, node_id="bare")  # no key and no endpoint yet
    await make_node(cp, node_id="a", endpoint="192.0.2.1:51820", public_key=base64.b64encode(bytes(range(32))).decode())
    before = await state_dump(cp.etcd)
    for gateway, code, reason in (("missing", grpc.StatusCode.NOT_FOUND, ""),
                                  ("bare", grpc.StatusCode.FAILED_PRECONDITION, "GATEWAY_NODE_NOT_READY")):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await create(cp.clients, guard=cp.guard, gateway=gateway)
        assert ei.value.code() == code
        if reason:
            assert details(ei.value)[1] == reason
        assert await state_dump(cp.etcd) == before
    c = await create(cp.clients, guard=cp.guard)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await create(cp.clients, guard=cp.guard)
    assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS
    before = await state_dump(cp.etcd)
    # Ranges, DNS servers and the gateway node are in the configuration handed out once: immutable.
    for path in ("allowed_ranges", "dns_servers", "gateway_node", "public_key", "config"):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await cp.clients.UpdateExternalClient(ec.UpdateExternalClientRequest(
                external_client=ec.ExternalClient(name=PHONE), update_mask=field_mask_pb2.FieldMask(paths=[path])))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "update_mask.paths[0]" in details(ei.value)[0]
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await cp.clients.DeleteExternalClient(ec.DeleteExternalClientRequest(name=PHONE, etag="1"))
    assert ei.value.code() == grpc.StatusCode.ABORTED
    assert await state_dump(cp.etcd) == before
    assert c.etag


async def test_without_a_key_service(cp):
    """Development mode: the pair is generated by the control plane and kept nowhere."""
    stub = external_client_pb2_grpc.ExternalClientServiceStub(cp.channel)
    await make_network(cp)
    await make_node(cp, node_id="a", endpoint="192.0.2.1:51820", public_key=base64.b64encode(bytes(range(32))).decode())
    c = await create(stub, allowed_ranges=["0.0.0.0/0"])
    conf = parse_config(c.config)
    assert "PresharedKey" not in conf["Peer"] and conf["Peer"]["AllowedIPs"] == "0.0.0.0/0"
    await assert_not_stored(cp.etcd, base64.b64decode(conf["Interface"]["PrivateKey"]))


async def test_deletes_stay_under_etcds_transaction_limit(keyed):
    """etcd refuses transactions of more than 128 operations: a node with 130
    pairs, and a forced delete of a node serving 20 clients, still go."""
    cp = keyed
    await make_network(cp)
    gw_key = base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    await make_node(cp, node_id="a", endpoint="192.0.2.1:51820", public_key=gw_key)
    await make_node(cp, node_id="hub", endpoint="192.0.2.2:51820")
    pairs = [f"networks/prod/nodes/hub|networks/prod/nodes/s{i}" for i in range(130)]
    keys = await cp.ks_as_cp.IssuePresharedKeys(keys_pb2.IssuePresharedKeysRequest(network="networks/prod", pairs=pairs))
    cp.guard.add(*(base64.b64decode(k.key) for k in keys.keys))
    await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name="networks/prod/nodes/hub"))
    left = [k for k in await state_dump(cp.etcd) if b"/keys/psk/prod/" in k]
    assert left == []
    for i in range(20):
        await create(cp.clients, guard=cp.guard, client_id=f"c{i}")
    await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name="networks/prod/nodes/a", force=True))
    dump = await state_dump(cp.etcd)
    assert [k for k in dump if b"externalClients/" in k or b"/clientKeys/" in k or b"/keys/clients/" in k] == []
    assert [k for k in dump if b"/ipam/" in k or b"/pubkeys/" in k or b"/keys/psk/" in k] == []


async def test_a_client_created_while_its_node_is_deleted_stops_the_delete(keyed):
    """The delete read "no clients"; a create commits before the delete does.
    The delete must not go through (the clients guard), and then refuses."""
    cp = keyed
    await make_network(cp)
    await make_node(cp, node_id="a", endpoint="192.0.2.1:51820",
                    public_key=base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode())
    etcd = cp.app.nodes.etcd
    real = etcd.list_prefix
    raced = []

    async def list_prefix(prefix, *a, **kw):
        out = await real(prefix, *a, **kw)
        if b"/externalClients/" in prefix and not raced:
            raced.append(await create(cp.clients, guard=cp.guard))  # lands after the delete's read
        return out

    etcd.list_prefix = list_prefix
    try:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await cp.nodes.DeleteNode(node_pb2.DeleteNodeRequest(name="networks/prod/nodes/a"))
    finally:
        etcd.list_prefix = real
    assert raced and ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION and PHONE in ei.value.details()
    assert await cp.etcd.get(cp.etcd.key("nodes", "prod", "a")) is not None


async def test_the_gateway_nodes_reports_show_the_clients_tunnel(keyed):
    """gatewayd reports its peers' handshake times and counters (Health); the
    control plane keeps those of the external clients it sent the node, and
    Get and List show them. Reports about other keys or from other nodes do not count."""
    from google.protobuf import timestamp_pb2

    from meshgate.api.v1 import agent_pb2

    cp = keyed
    a, b = await agents(cp)
    c = await create(cp.clients, guard=cp.guard)
    await wait_until(lambda: peer(a, PHONE) is not None, "phone on a")
    handshake = timestamp_pb2.Timestamp(seconds=1_790_000_000)

    def health(*peers):
        h = agent_pb2.SyncRequest.Health()
        for key, rx in peers:
            h.peers.add(public_key=key, latest_handshake_time=handshake, rx_bytes=rx, tx_bytes=rx * 2)
        return agent_pb2.SyncRequest(health=h)

    got = await cp.clients.GetExternalClient(ec.GetExternalClientRequest(name=PHONE))
    assert not got.HasField("last_handshake_time") and not got.HasField("report_time")
    # b was never sent the client: its report about the client's key is ignored.
    await b._acks.put(health((c.public_key, 999)))
    # a reports it (and a stranger key, ignored).
    await a._acks.put(health((c.public_key, 1234), (base64.b64encode(bytes(32)).decode(), 5)))

    async def reported():
        g = await cp.clients.GetExternalClient(ec.GetExternalClientRequest(name=PHONE))
        return g if g.rx_bytes else None

    got = await wait_until(reported, "the client's tunnel shown")
    assert (got.last_handshake_time, got.rx_bytes, got.tx_bytes) == (handshake, 1234, 2468)
    assert got.HasField("report_time")
    listed = await cp.clients.ListExternalClients(ec.ListExternalClientsRequest(parent="networks/prod"))
    assert [(x.name, x.rx_bytes) for x in listed.external_clients] == [(PHONE, 1234)]
    # Deleting the client deletes its report too.
    await cp.clients.DeleteExternalClient(ec.DeleteExternalClientRequest(name=PHONE))
    assert [k for k in await state_dump(cp.etcd) if b"/clientHealth/" in k] == []


async def test_rotating_a_clients_key_hands_out_a_new_config_once(keyed):
    cp = keyed
    a, b = await agents(cp)
    c = await create(cp.clients, guard=cp.guard)
    old_conf = parse_config(c.config)
    await wait_until(lambda: peer(a, PHONE) is not None and peer(a, PHONE).public_key == c.public_key, "phone on a")
    # A stale etag: refused before anything is issued.
    before = await config_state(cp.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await cp.clients.RotateExternalClientKey(ec.RotateExternalClientKeyRequest(name=PHONE, etag="1"))
    assert ei.value.code() == grpc.StatusCode.ABORTED
    assert await config_state(cp.etcd) == before
    r = await cp.clients.RotateExternalClientKey(ec.RotateExternalClientKeyRequest(name=PHONE, etag=c.etag))
    conf = parse_config(r.config)
    cp.guard.add(base64.b64decode(conf["Interface"]["PrivateKey"]), base64.b64decode(conf["Peer"]["PresharedKey"]),
                 r.config)
    derived = X25519PrivateKey.from_private_bytes(base64.b64decode(conf["Interface"]["PrivateKey"])).public_key()
    assert base64.b64encode(derived.public_bytes_raw()).decode() == r.public_key != c.public_key
    assert conf["Peer"]["PresharedKey"] != old_conf["Peer"]["PresharedKey"]
    assert conf["Interface"]["Address"] == old_conf["Interface"]["Address"]  # same addresses
    # The gateway node now has the new key, signed, with the new PSK; the old key is gone.
    await wait_until(lambda: peer(a, PHONE) is not None and peer(a, PHONE).public_key == r.public_key, "new key on a")
    p = peer(a, PHONE)
    assert signing.verify_any(a.authority, PHONE, p.public_key, p.public_key_signature)
    assert p.preshared_key == conf["Peer"]["PresharedKey"]
    assert c.public_key not in [x.public_key for x in a.state.peers]
    got = await cp.clients.GetExternalClient(ec.GetExternalClientRequest(name=PHONE))
    assert got.public_key == r.public_key and got.config == ""
    keys = await state_dump(cp.etcd)
    claims = [v for k, v in keys.items() if b"/pubkeys/prod/" in k and v == PHONE.encode()]
    assert len(claims) == 1  # the old key's claim went with it


async def test_concurrent_rotations_leave_record_and_key_service_agreeing(keyed):
    cp = keyed
    a, b = await agents(cp)
    await create(cp.clients, guard=cp.guard)
    results = await asyncio.gather(*(cp.clients.RotateExternalClientKey(ec.RotateExternalClientKeyRequest(name=PHONE))
                                     for _ in range(3)), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, Exception)]
    for r in ok:
        conf = parse_config(r.config)
        cp.guard.add(base64.b64decode(conf["Interface"]["PrivateKey"]), base64.b64decode(conf["Peer"]["PresharedKey"]),
                     r.config)
    assert ok and all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.ABORTED
                      for r in results if isinstance(r, Exception))
    got = await cp.clients.GetExternalClient(ec.GetExternalClientRequest(name=PHONE))
    sig = keys_pb2.SignedNodeKey.FromString((await cp.etcd.get(cp.etcd.key("keys", "clientKeys", "prod", "phone"))).value)
    assert got.public_key == sig.public_key  # the record names the key the key service signed
    assert got.public_key in [r.public_key for r in ok]


async def test_rotation_without_a_key_service(cp):
    stub = external_client_pb2_grpc.ExternalClientServiceStub(cp.channel)
    await make_network(cp)
    await make_node(cp, node_id="a", endpoint="192.0.2.1:51820", public_key=base64.b64encode(bytes(range(32))).decode())
    c = await create(stub)
    r = await stub.RotateExternalClientKey(ec.RotateExternalClientKeyRequest(name=PHONE))
    assert r.public_key != c.public_key and "PrivateKey = " in r.config


async def test_a_client_shows_when_its_configuration_went_stale(keyed):
    """The gateway node's endpoint or key changes, or PSKs are turned off: Get
    says why the handed-out configuration no longer works; a key rotation
    hands out a current one."""
    from meshgate.api.v1 import network_pb2

    cp = keyed
    await make_network(cp)
    gw_key = base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    await make_node(cp, node_id="a", endpoint="192.0.2.1:51820", public_key=gw_key)
    c = await create(cp.clients, guard=cp.guard)

    async def reason():
        return (await cp.clients.GetExternalClient(ec.GetExternalClientRequest(name=PHONE))).config_stale_reason

    assert await reason() == ""
    await cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
        node=node_pb2.Node(name="networks/prod/nodes/a", endpoint="192.0.2.9:51820"),
        update_mask=field_mask_pb2.FieldMask(paths=["endpoint"])))
    await wait_until(lambda: reason(), "stale after the endpoint changed")
    assert await reason() == "the gateway node's endpoint changed"
    new_key = base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    await cp.nodes.UpdateNode(node_pb2.UpdateNodeRequest(
        node=node_pb2.Node(name="networks/prod/nodes/a", public_key=new_key),
        update_mask=field_mask_pb2.FieldMask(paths=["public_key"])))
    await wait_until(lambda: _contains(reason(), "key changed"), "stale after the key changed")
    assert await reason() == "the gateway node's key changed; the gateway node's endpoint changed"
    r = await cp.clients.RotateExternalClientKey(ec.RotateExternalClientKeyRequest(name=PHONE))
    conf = parse_config(r.config)
    cp.guard.add(base64.b64decode(conf["Interface"]["PrivateKey"]), base64.b64decode(conf["Peer"]["PresharedKey"]),
                 r.config)
    assert conf["Peer"]["PublicKey"] == new_key and conf["Peer"]["Endpoint"] == "192.0.2.9:51820"
    assert await reason() == ""
    await cp.networks.UpdateNetwork(network_pb2.UpdateNetworkRequest(
        network=network_pb2.Network(name="networks/prod", disable_preshared_keys=True),
        update_mask=field_mask_pb2.FieldMask(paths=["disable_preshared_keys"])))
    await wait_until(lambda: reason(), "stale after PSKs were turned off")
    assert await reason() == "pre-shared keys were turned off"
    listed = await cp.clients.ListExternalClients(ec.ListExternalClientsRequest(parent="networks/prod"))
    assert [x.config_stale_reason for x in listed.external_clients] == ["pre-shared keys were turned off"]
    assert c.config_stale_reason == ""


async def _contains(coro, text):
    return text in await coro
