"""The network status shows what each node's drift watcher reported in its acks
(sync.py, `Ack.drift` -> `NodeConvergence.drift`): repairs, a fight, what drifted.
The agent's side, with real kernels, is services/gatewayd/tests/test_system_drift.py."""

from __future__ import annotations

from cptest import SimAgent, make_key, make_network, wait_until
from meshgate.api.v1 import agent_pb2, network_pb2


def ack(revision: int, **drift) -> agent_pb2.SyncRequest:
    a = agent_pb2.SyncRequest.Ack(revision=revision)
    if drift:
        a.drift.repairs, a.drift.fighting, a.drift.fights = drift["repairs"], drift["fighting"], drift["fights"]
        a.drift.last_drift.extend(drift.get("last_drift", ()))
        a.drift.last_drift_time.FromNanoseconds(1_796_000_000_000_000_000)
    return agent_pb2.SyncRequest(ack=a)


async def test_the_status_shows_the_last_drift_an_agent_reported(cp):
    await make_network(cp)
    ek = await make_key(cp)
    a = await (await SimAgent(cp.agents, ek.secret, "a", ack=False).enroll()).connect()

    async def node():
        st = await cp.networks.GetNetworkStatus(network_pb2.GetNetworkStatusRequest(name="networks/prod"))
        return st.nodes[0]

    try:
        await wait_until(lambda: a.state is not None, "snapshot")
        rev = a.state.revision
        await a._acks.put(ack(rev))  # an agent that does not watch: no drift at all

        async def converged():
            n = await node()
            return n.converged
        await wait_until(converged, "converged")
        assert not (await node()).HasField("drift")

        fight = ["add route 198.51.100.0/24 metric 0"]
        await a._acks.put(ack(rev, repairs=7, fighting=True, fights=1, last_drift=fight))

        async def fighting():
            n = await node()
            return n.drift.fighting and n.drift.repairs == 7
        await wait_until(fighting, "the fight in the status")
        n = await node()
        assert list(n.drift.last_drift) == fight and n.drift.fights == 1 and n.converged
        assert n.drift.last_drift_time.ToNanoseconds() == 1_796_000_000_000_000_000

        # the same ack again once the fight is over (what the agent sends)
        await a._acks.put(ack(rev, repairs=9, fighting=False, fights=1, last_drift=fight))

        async def over():
            n = await node()
            return not n.drift.fighting and n.drift.repairs == 9
        await wait_until(over, "the fight over")
        assert (await node()).converged
    finally:
        await a.close()
