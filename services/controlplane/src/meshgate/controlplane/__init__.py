"""The meshgate control plane: the network API, with all state in etcd.

Layers point one way: `api` (gRPC handlers) -> `resources` (core logic:
validation, IPAM, transactions) -> `meshgate.common.etcd` (the adapter).
`validation`, `ipam`, `names` and `masks` are pure.
"""
