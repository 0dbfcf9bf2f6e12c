"""The key service's core, composed: what the gRPC handlers call, and what a
process (or a test, or the control plane in-process) starts and stops.

    core = KeyServiceCore(etcd, Keyring.from_config(kek_file, kek))
    await core.start()     # checks the KEK (KekError if wrong), creates authority and CA once
    ...                    # core.authority, core.psk, core.clients, core.ca, core.vault
    await core.stop()

With `scheduler=True` it campaigns for the scheduler lease and, while leading,
runs scheduled rotations every `scheduler_interval` seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from meshgate.common.etcd import Etcd
from meshgate.keyservice.authority import Authority
from meshgate.keyservice.ca import CertificateAuthority
from meshgate.keyservice.clients import ClientKeys
from meshgate.keyservice.election import Election
from meshgate.keyservice.psk import PresharedKeys
from meshgate.keyservice.scheduler import Scheduler
from meshgate.keyservice.sealing import Keyring
from meshgate.keyservice.vault import Vault

log = logging.getLogger(__name__)

LEADER = "keys/leader"


class KeyServiceCore:
    def __init__(
        self,
        etcd: Etcd,
        keyring: Keyring,
        *,
        cert_validity: dt.timedelta = dt.timedelta(hours=24),
        scheduler: bool = True,
        scheduler_interval: float = 30.0,
        election_ttl: int = 10,
        identity: str = "",
    ) -> None:
        self.etcd = etcd
        self.vault = Vault(etcd, keyring)
        self.authority = Authority(self.vault)
        self.psk = PresharedKeys(self.vault)
        self.clients = ClientKeys(self.vault, self.authority)
        self.ca = CertificateAuthority(self.vault, cert_validity)
        self.election = Election(etcd, LEADER, identity, election_ttl)
        self.scheduler = Scheduler(self.vault, self.psk, scheduler_interval)
        self.run_scheduler = scheduler
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.vault.open()
        await self.authority.ensure()
        await self.ca.ensure()
        if self.run_scheduler:
            self._task = asyncio.ensure_future(self.election.run(self.scheduler.lead))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.election.resign()
