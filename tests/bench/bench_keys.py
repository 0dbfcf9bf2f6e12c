"""Key-service benchmark: pre-shared keys for a 1,000-node hub-and-spoke network.

Run as `.venv/bin/python tests/bench/bench_keys.py`. It starts its own etcd
(temporary data directory, free loopback ports) and a real
`meshgate-keyservice` process with a freshly generated KEK file, writes the
networks where the control plane would, and prints `BENCH <name> <value>
<unit>` lines on stdout; everything else goes to stderr.

Figures (one IssuePresharedKeys call carrying all 1,000 pairs, as the
control plane sends when it compiles a hub's peers; median of several
networks):

- `psk_issue_1000_pairs_ms`: first issue, every pair new (generate, seal,
  commit), measured at the client;
- `psk_issue_1000_pairs_etcd_writes`: write transactions etcd counted for it
  (revisions), and `psk_issue_1000_pairs_keys_written`: keys they wrote;
- `psk_reissue_1000_pairs_ms`: the same call again (every key exists: one
  range read, 1,000 decryptions, no write);
- `psk_rotate_network_1000_ms`: RotatePresharedKeys for the whole network in
  the key service alone (a new epoch: claim, rotate, finish). Not
  `psk_rotate_all_1000_ms`, which runs until every agent acknowledged.

Everything started here is stopped by its handle and removed, also on failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time

import grpc
from benchkit import bench, info

from meshgate.api.v1 import keys_pb2, keys_pb2_grpc, network_pb2
from meshgate.common.etcd import Etcd
from meshgate.common.etcdproc import EtcdProcess
from meshgate.common.testing import ServiceProcess
from meshgate.keyservice.sealing import kek_line

PREFIX = "/bench-keys"
PAIRS = 1000
RUNS = 5


async def measure(target: str, endpoint: str) -> None:
    etcd = Etcd(endpoint, PREFIX)
    await etcd.connect()
    issue_ms, reissue_ms, rotate_ms, writes, keys_written = [], [], [], [], []
    try:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = keys_pb2_grpc.KeyServiceStub(ch)
            for run in range(RUNS + 1):  # run 0 warms up
                net = f"bench{run}"
                n = network_pb2.Network(name=f"networks/{net}", ipv4_cidr="100.64.0.0/16")
                n.create_time.GetCurrentTime()
                await etcd.put(etcd.key("networks", net), n.SerializeToString())
                pairs = [f"networks/{net}/nodes/hub|networks/{net}/nodes/spoke{i:04d}" for i in range(PAIRS)]
                req = keys_pb2.IssuePresharedKeysRequest(network=f"networks/{net}", pairs=pairs)
                rev0 = await etcd.revision()
                t0 = time.perf_counter()
                resp = await stub.IssuePresharedKeys(req, timeout=60)
                t1 = time.perf_counter()
                rev1 = await etcd.revision()
                kvs, _ = await etcd.list_prefix(etcd.key("keys", "psk", net) + b"/")
                assert len(resp.keys) == PAIRS and len(kvs) == PAIRS
                t2 = time.perf_counter()
                again = await stub.IssuePresharedKeys(req, timeout=60)
                t3 = time.perf_counter()
                assert [k.key for k in again.keys] == [k.key for k in resp.keys]
                assert await etcd.revision() == rev1, "re-issuing existing keys must not write"
                t4 = time.perf_counter()
                rot = await stub.RotatePresharedKeys(
                    keys_pb2.RotatePresharedKeysRequest(network=f"networks/{net}"), timeout=60)
                t5 = time.perf_counter()
                assert rot.rotated == PAIRS
                if run == 0:
                    continue
                issue_ms.append((t1 - t0) * 1000)
                reissue_ms.append((t3 - t2) * 1000)
                rotate_ms.append((t5 - t4) * 1000)
                writes.append(rev1 - rev0)
                keys_written.append(len(kvs))
                info(f"run {run}: issue {issue_ms[-1]:.1f} ms in {writes[-1]} write txns; "
                     f"reissue {reissue_ms[-1]:.1f} ms; rotate {rotate_ms[-1]:.1f} ms")
    finally:
        await etcd.close()
    bench("psk_issue_1000_pairs_ms", statistics.median(issue_ms), "ms")
    bench("psk_issue_1000_pairs_etcd_writes", statistics.median(writes), "txns")
    bench("psk_issue_1000_pairs_keys_written", statistics.median(keys_written), "keys")
    bench("psk_reissue_1000_pairs_ms", statistics.median(reissue_ms), "ms")
    bench("psk_rotate_network_1000_ms", statistics.median(rotate_ms), "ms")


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    work = tempfile.mkdtemp(prefix="meshgate-bench-keys-")
    etcd = ks = None
    try:
        etcd = EtcdProcess(os.path.join(work, "etcd")).start()
        kek = os.path.join(work, "kek")
        fd = os.open(kek, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(kek_line("bench") + "\n")
        ks = ServiceProcess(
            "meshgate-keyservice",
            ["--etcd-endpoints", etcd.endpoint, "--etcd-prefix", PREFIX, "--kek-file", kek, "--no-scheduler",
             "--insecure"],  # the figures are the key service's own work, not TLS
            log_path=os.path.join(work, "keyservice.log"),
        ).start()
        info(f"key service on {ks.target}, etcd on {etcd.endpoint}")
        asyncio.run(measure(ks.target, etcd.endpoint))
    finally:
        if ks is not None:
            ks.stop()
        if etcd is not None:
            etcd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
