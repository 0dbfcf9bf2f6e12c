"""The kernel backend: the WireGuard module over generic netlink, through pyroute2.

Each peer operation is one ``WG_CMD_SET_DEVICE`` message carrying one peer with
``WGPEER_F_UPDATE_ONLY`` / ``WGPEER_F_REMOVE_ME`` / ``WGPEER_F_REPLACE_ALLOWEDIPS``;
``WGDEVICE_F_REPLACE_PEERS`` is never sent.  Hazard: pyroute2 decodes keys as base64
``bytes``; they are turned into ``Secret``s (private, pre-shared) at once.

This code runs only where the module exists; its tests skip, with the reason, on
hosts without it (such as the CI machines, which use wireguard-go).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from typing import Any

from meshgate.gatewayd.errors import ApplyError
from meshgate.gatewayd.keys import Secret, public_key_of
from meshgate.gatewayd.model import ZERO_KEY, ObservedDevice, PeerSpec
from meshgate.gatewayd.planner import DeviceChange, PeerOp
from meshgate.gatewayd.wireguard import PeerStats


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, dict):
        v = v.get("value")
    if isinstance(v, bytes):
        v = v.decode()
    return v


def _split_endpoint(ep: str) -> tuple[str, int]:
    if ep.startswith("["):
        host, _, port = ep[1:].rpartition("]:")
    else:
        host, _, port = ep.rpartition(":")
    return host, int(port)


def _peer_dict(op: PeerOp) -> dict[str, Any]:
    d: dict[str, Any] = {"public_key": op.public_key}
    if op.kind == "remove":
        d["remove"] = True
        return d
    if op.kind == "update":
        d["update_only"] = True
    if op.preshared_key is not None:
        d["preshared_key"] = op.preshared_key.reveal()
    elif op.clear_preshared_key:
        d["preshared_key"] = ZERO_KEY
    if op.endpoint is not None:
        d["endpoint_addr"], d["endpoint_port"] = _split_endpoint(op.endpoint)
    if op.keepalive is not None:
        d["persistent_keepalive"] = op.keepalive
    if op.allowed_ips is not None:
        d["replace_allowed_ips"] = True
        d["allowed_ips"] = sorted(op.allowed_ips)
    return d


class KernelBackend:
    name = "kernel"

    def __init__(self) -> None:
        from pyroute2 import (  # imported here: only this backend needs it
            IPRoute,
            WireGuard,
        )

        self._IPRoute = IPRoute
        self._WireGuard = WireGuard

    def observe(self, ifname: str) -> tuple[ObservedDevice, dict[str, PeerStats]] | None:
        wg = self._WireGuard()
        try:
            msgs = list(wg.info(ifname))
        except Exception as e:  # noqa: BLE001 - pyroute2 raises NetlinkError, OSError, ValueError...: every failure is an ApplyError
            if getattr(e, "code", None) in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                return None
            raise ApplyError("wireguard", f"netlink get {ifname}: {e}") from None
        finally:
            wg.close()
        pub = None
        listen_port = fwmark = 0
        peers: dict[str, PeerSpec] = {}
        stats: dict[str, PeerStats] = {}
        for msg in msgs:
            priv = _text(msg.get_attr("WGDEVICE_A_PRIVATE_KEY"))
            if priv and priv != ZERO_KEY:
                pub = public_key_of(Secret(priv))
            listen_port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or listen_port
            fwmark = msg.get_attr("WGDEVICE_A_FWMARK") or fwmark
            for p in msg.get_attr("WGDEVICE_A_PEERS") or []:
                key = _text(p.get_attr("WGPEER_A_PUBLIC_KEY"))
                if key is None:  # every peer the kernel reports has one
                    continue
                psk = _text(p.get_attr("WGPEER_A_PRESHARED_KEY"))
                ep = p.get_attr("WGPEER_A_ENDPOINT")
                endpoint = None
                if ep and ep.get("addr") and ep.get("port"):
                    a = ep["addr"]
                    endpoint = f"[{a}]:{ep['port']}" if ":" in a else f"{a}:{ep['port']}"
                ips = [a["addr"] for a in (p.get_attr("WGPEER_A_ALLOWEDIPS") or []) if a.get("addr")]
                hs = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
                spec = peers.get(key)
                allowed = frozenset(ips) | (spec.allowed_ips if spec else frozenset())
                peers[key] = PeerSpec(
                    public_key=key,
                    allowed_ips=allowed,
                    preshared_key=Secret(psk) if psk and psk != ZERO_KEY else None,
                    endpoint=endpoint,
                    keepalive=p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
                )
                stats[key] = PeerStats(endpoint, hs.get("tv_sec", 0), hs.get("tv_nsec", 0),
                                       p.get_attr("WGPEER_A_RX_BYTES") or 0,
                                       p.get_attr("WGPEER_A_TX_BYTES") or 0)
        return ObservedDevice(pub, listen_port, fwmark, peers), stats

    def create(self, ifname: str) -> None:
        with self._IPRoute() as ipr:
            if ipr.link_lookup(ifname=ifname):
                return
            try:
                ipr.link("add", ifname=ifname, kind="wireguard")
            except Exception as e:  # noqa: BLE001 - any netlink failure is an ApplyError (retried)
                raise ApplyError("wireguard", f"cannot create {ifname}: {e}") from None

    def configure(self, ifname: str, private_key: Secret | None, device: DeviceChange | None,
                  ops: Sequence[PeerOp]) -> None:
        wg = self._WireGuard()
        try:
            if device is not None:
                wg.set(
                    ifname,
                    private_key=private_key.reveal() if device.set_private_key and private_key else None,
                    listen_port=device.listen_port,
                    fwmark=device.fwmark,
                )
            for op in ops:
                wg.set(ifname, peer=_peer_dict(op))
        except ApplyError:
            raise
        except Exception as e:  # noqa: BLE001 - any netlink failure is an ApplyError (retried)
            # pyroute2's message may include attributes; keep only the error code
            raise ApplyError("wireguard", f"netlink set {ifname} failed: "
                             f"{getattr(e, 'code', type(e).__name__)}") from None
        finally:
            wg.close()

    def kick(self, ifname: str, peers: Mapping[str, int]) -> None:
        """A keepalive to every peer now: persistent keepalive off, on (which sends one
        at once), back to its value (see ``userspace.kick_lines``)."""
        wg = self._WireGuard()
        try:
            for key, keepalive in sorted(peers.items()):
                for value in (0, 1, keepalive):
                    wg.set(ifname, peer={"public_key": key, "update_only": True,
                                         "persistent_keepalive": value})
        except Exception as e:  # noqa: BLE001 - any netlink failure is an ApplyError (retried)
            raise ApplyError("wireguard", f"netlink set {ifname} failed: "
                             f"{getattr(e, 'code', type(e).__name__)}") from None
        finally:
            wg.close()

    def destroy(self, ifname: str) -> None:
        with self._IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if idx:
                ipr.link("del", index=idx[0])

    def alive(self, ifname: str) -> bool:
        with self._IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=ifname))
