"""The network status keeps the routes each node's agent declined (sync.py):
read from the ErrorInfos of its acks (gatewayd's consent.py sends them),
replaced by every applied ack, kept across a failed apply (the node keeps what
it applied), bounded, and shown by GetNetworkStatus. The real agents' side is in
services/gatewayd/tests/test_route_consent_system.py."""

from __future__ import annotations

from google.rpc import error_details_pb2, status_pb2

from cptest import SimAgent, make_key, make_network, wait_until
from meshgate.api.v1 import agent_pb2, network_pb2
from meshgate.controlplane import sync


def ack(revision: int, code: int = 0, message: str = "", **kinds: tuple[str, str]) -> agent_pb2.SyncRequest:
    st = status_pb2.Status(code=code, message=message)
    for reason, (routes, why) in kinds.items():
        info = error_details_pb2.ErrorInfo(reason=reason, domain="gatewayd.meshgate")
        info.metadata["routes"] = routes
        info.metadata["reason"] = why
        st.details.add().Pack(info)
    return agent_pb2.SyncRequest(ack=agent_pb2.SyncRequest.Ack(revision=revision, status=st))


def test_what_an_ack_says():
    st = ack(3, DEFAULT_ROUTE_DECLINED=("default route", "no consent"),
             ROUTE_NOT_ACCEPTED=("10.1.0.0/16,203.0.113.0/24", "not within")).ack.status
    assert sync.declined_routes(st) == [
        {"destination": "default route", "reason": "DEFAULT_ROUTE_DECLINED", "message": "no consent"},
        {"destination": "10.1.0.0/16", "reason": "ROUTE_NOT_ACCEPTED", "message": "not within"},
        {"destination": "203.0.113.0/24", "reason": "ROUTE_NOT_ACCEPTED", "message": "not within"}]
    assert sync.declined_routes(ack(3).ack.status) == []  # applied, nothing declined
    assert sync.declined_routes(ack(3, code=7, PEER_KEY_REFUSED=("x", "")).ack.status) == []  # applied, peers refused
    assert sync.declined_routes(ack(3, code=9, message="nft failed").ack.status) is None  # says nothing about routes
    many = ",".join(f"198.51.100.{i}/32" for i in range(250)) + "," + ",".join(f"203.0.113.{i}/32" for i in range(50))
    assert len(sync.declined_routes(ack(1, ROUTE_NOT_ACCEPTED=(many, "x")).ack.status)) == sync.MAX_DECLINED


async def test_the_status_keeps_them_until_an_applied_ack_says_otherwise(cp):
    await make_network(cp)
    ek = await make_key(cp)
    a = await (await SimAgent(cp.agents, ek.secret, "a", ack=False).enroll()).connect()

    async def declined():
        st = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
        return [(d.destination, d.reason, d.message) for d in st.nodes[0].declined_routes], st.nodes[0]

    try:
        await wait_until(lambda: a.state is not None, "snapshot")
        rev = a.state.revision
        await a._acks.put(ack(rev, message="declined ...", DEFAULT_ROUTE_DECLINED=("default route", "no consent"),
                              ROUTE_NOT_ACCEPTED=("198.51.100.0/24", "not within 10.0.0.0/8")))
        want = [("default route", "DEFAULT_ROUTE_DECLINED", "no consent"),
                ("198.51.100.0/24", "ROUTE_NOT_ACCEPTED", "not within 10.0.0.0/8")]

        async def shown():
            got, node = await declined()
            return got == want and node.converged and node.last_error == ""
        await wait_until(shown, "declined routes in the status")

        # A failed apply changes nothing the node installed: the declines stay.
        await a._acks.put(ack(rev, code=9, message="nft: failed"))

        async def failed():
            got, node = await declined()
            return node.last_error == "nft: failed" and got == want
        await wait_until(failed, "the error, declines kept")

        # The retry of that revision applies, without them: they are cleared,
        # and so is the error (the node converged on the same revision).
        await a._acks.put(ack(rev))

        async def cleared():
            got, node = await declined()
            return got == [] and node.last_error == "" and node.converged
        await wait_until(cleared, "declines and the error cleared, converged")
    finally:
        await a.close()
