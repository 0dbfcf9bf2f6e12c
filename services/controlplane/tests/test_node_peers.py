"""`compiler.node_peers` (one node's peers, worked out without an index, what
the state cache asks on every join) agrees with `PeerIndex.peers_of` on every
network the filters' property test draws, including nodes without a key."""

from hypothesis import given, settings
from hypothesis import strategies as st

from meshgate.controlplane import compiler
from test_filters import networks


@settings(max_examples=400, deadline=None)
@given(networks(), st.data())
def test_node_peers_matches_the_index(state, data):
    # Some nodes without a key (enrolled nodes always have one; created ones may not).
    for name in data.draw(st.lists(st.sampled_from(sorted(state.nodes)), unique=True, max_size=2)):
        state.nodes[name].public_key = ""
    index = compiler.PeerIndex(state)
    for name in state.nodes:
        assert compiler.node_peers(state, name) == index.peers_of(name), name
        assert compiler.peers_of(state, name) == compiler.peers_of(state, name, index)
    assert compiler.node_peers(state, "networks/n/nodes/nobody") == []
