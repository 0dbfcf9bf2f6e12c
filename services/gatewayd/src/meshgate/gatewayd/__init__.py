"""gatewayd: the meshgate node agent.

It reconciles the host to a desired state: its WireGuard interface and peers, the
addresses and routes of the overlay, an nftables table of its own for egress NAT and
forwarding, and the forwarding sysctls.  See ``docs/gatewayd.md``.

Layers point one way: ``main``/``agent`` (entry points, the loop) -> ``reconciler``
(observe, plan, apply) -> ``planner``/``model`` (pure) and the adapters
(``wireguard``, ``routing``, ``nftables``, ``sysctl``).
"""
