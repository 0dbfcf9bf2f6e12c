"""The late-reply link: a VXLAN device over the overlay between egress gateways.

When other nodes move a range from this gateway to another one, the replies already on their way back through this one
would be refused by a node that has switched: WireGuard accepts a source address
only from the peer that holds it now. So while another gateway carries a range
of this one (or is about to), the nftables table copies each reply this node
forwards from that range to the overlay (``dup``) into this link, addressed to
that gateway's node; the other gateway forwards the copy into the tunnel, and a
node that routes through it accepts it (the node that has not switched yet
takes the original and refuses the copy). docs/gatewayd.md, "Late replies".

The link, ``<interface>h``, exists on a gateway node whenever another gateway
node shares one of its ranges (``EgressConfig.handoffs`` lists where copies go
now; ``HandoffSpec.peers`` every node that may send or receive them, so a
handoff starting or ending only changes the copying). The copying is a table
of its own, ``ip meshgate_handoff`` (nftables has ``dup`` in the ip and ip6
families only, not in inet), replaced whole in one transaction; the receiving
rules are in ``inet meshgate`` (nftrules.py). It carries frames
only to and from those nodes' overlay IPv4 addresses (static forwarding and
neighbour entries, no learning, no flooding), over WireGuard, so only a
gateway node of the network can send into it; the table accepts from it only
replies from this gateway's ranges to the overlay.

Each node's link has the MAC address made of its overlay IPv4 address, so each
sender knows every receiver's without ARP. A copy's next hop is set by a route
in a table of its own (``handoff_table``), looked up through a rule for this
link's output only (``oif``): ``dup to <address> device`` otherwise resolves
the reply's own destination on the link. Written through ``ip`` and
``bridge``; owned by name (a link of that name that is not a VXLAN with this
module's VNI is left alone, and a pass that wants the link fails on it).

Its UDP socket listens on every address, so ``inet meshgate`` drops VXLAN that
does not come through the tunnel from a late-reply peer, and anything that
comes out of the link addressed to this node itself (nftrules.py).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
import subprocess
from dataclasses import dataclass

from meshgate.gatewayd.errors import ApplyError
from meshgate.gatewayd.model import HandoffSpec
from meshgate.gatewayd.nftrules import HANDOFF_PORT as PORT
from meshgate.gatewayd.nftrules import HANDOFF_VNI as VNI
from meshgate.gatewayd.nftrules import handoff_device

log = logging.getLogger(__name__)
TABLE = "meshgate_handoff"
_DIGEST = re.compile(r'comment "meshgate-handoff:([0-9a-f]{16})"')


def copy_table(spec: HandoffSpec, wg: str) -> tuple[str, str]:
    """(``nft -f`` text of table ``ip meshgate_handoff``, its digest)."""
    # never a copy of a copy: two gateways copying to each other would bounce it
    rules = [f'\t\tiifname != "{spec.device}" oifname "{wg}" ip saddr {{ {", ".join(ranges)} }} ip daddr {{ {", ".join(sources)} }} '
             f'dup to {addr} device "{spec.device}"' for ranges, sources, addr in spec.copies if sources]
    body = "\n".join([f"table ip {TABLE} {{", "\tchain copies {",
                      "\t\ttype filter hook forward priority filter - 1; policy accept;", *rules,
                      '\t\tcounter comment "meshgate-handoff:@D@"', "\t}", "}"]) + "\n"
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    return body.replace("@D@", digest), digest


def _copies_digest() -> str | None:
    r = _run(["nft", "list", "table", "ip", TABLE], check=False)
    m = _DIGEST.search(r.stdout) if r.returncode == 0 else None
    return m.group(1) if m else ("" if r.returncode == 0 else None)


def _no_rp_filter(device: str) -> None:
    """Copies come in with a source in the ranges, which routes through the
    egress interface: no reverse-path check on the link (the kernel applies the
    higher of the link's and `all`'s settings, so `all` set to 1 still drops them)."""
    with open(f"/proc/sys/net/ipv4/conf/{device}/rp_filter", "w") as f:
        f.write("0")
    try:
        with open("/proc/sys/net/ipv4/conf/all/rp_filter") as f:
            strict = f.read().strip() == "1"
    except OSError:
        strict = False
    if strict:
        log.warning("net.ipv4.conf.all.rp_filter is 1 (strict): late replies copied to this node are dropped; "
                    "set it to 2 (loose) or 0 for drains to lose nothing")


def mac_of(address: str) -> str:
    """The link's MAC address on the node with overlay IPv4 `address`:
    locally administered, the address's four bytes, then ``6d``."""
    b = ipaddress.IPv4Address(address).packed
    return "02:" + ":".join(f"{x:02x}" for x in b) + ":6d"


def _run(cmd: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise ApplyError("handoff", f"{' '.join(cmd[:4])}: {r.stderr.strip()[:1000]}")
    return r


@dataclass(frozen=True)
class Observed:
    link: HandoffSpec | None
    """The link as the kernel holds it (its `copies` left empty); None when absent."""
    copies_digest: str | None
    """The digest of table ``ip meshgate_handoff``, None when absent."""
    foreign: bool = False
    """A link of the link's name exists and is not one (left alone)."""


def observe(device: str, table: int, wanted: bool = True) -> Observed:
    """The link and the copy table. The table is read only when the link
    exists or is `wanted`: a node that has neither pays one ``ip`` call."""
    try:
        link = _observe_link(device, table)
    except _Foreign:
        return Observed(None, None, foreign=True)
    return Observed(link, _copies_digest() if link is not None or wanted else None)


class _Foreign(Exception):
    pass


def _observe_link(device: str, table: int) -> HandoffSpec | None:
    """The link (None when absent). Peers count only with their forwarding
    entry, neighbour entry and route all in place."""
    r = _run(["ip", "-json", "-d", "link", "show", "dev", device], check=False)
    if r.returncode != 0:
        return None
    links = json.loads(r.stdout or "[]")
    if not links:
        return None
    link = links[0]
    info = link.get("linkinfo", {})
    data = info.get("info_data", {})
    if info.get("info_kind") != "vxlan" or data.get("id") != VNI:
        raise _Foreign(device)
    local = data.get("local", "")
    if "UP" not in link.get("flags", []) or data.get("port") != PORT or link.get("address") != (
            mac_of(local) if local else ""):
        return HandoffSpec(device, "", frozenset(), 0)  # to be made again
    fdb = {e.get("dst") for e in json.loads(_run(["bridge", "-json", "fdb", "show", "dev", device]).stdout or "[]")
           if e.get("state") == "permanent" and e.get("dst") and e.get("mac") == mac_of(e["dst"])}
    neigh = {e.get("dst") for e in json.loads(_run(["ip", "-json", "neigh", "show", "dev", device]).stdout or "[]")
             if "PERMANENT" in e.get("state", []) and e.get("lladdr") == mac_of(e.get("dst", "0.0.0.0"))}
    routes = {e.get("dst") for e in json.loads(
        _run(["ip", "-4", "-json", "route", "show", "table", str(table), "dev", device], check=False).stdout or "[]")}
    return HandoffSpec(device, local, frozenset(fdb & neigh & routes), link.get("mtu", 0))


def apply(want: HandoffSpec | None, observed: Observed, wg: str, table: int, protocol: int) -> None:
    """Make the link and the copying `want` (or remove both, for None) from `observed`."""
    device = handoff_device(wg)
    if observed.foreign:
        if want is None:
            return  # someone else's link of that name: not ours to remove
        raise ApplyError("handoff", f"link {device} exists and is not meshgate's late-reply link")
    if want is None:
        if observed.copies_digest is not None:
            _run(["nft", "delete", "table", "ip", TABLE], check=False)
        if observed.link is not None:
            _run(["ip", "link", "del", "dev", device], check=False)
            _run(["ip", "-4", "route", "flush", "table", str(table)], check=False)
        return
    _apply_link(want, observed.link, device, table, protocol)
    text, digest = copy_table(want, wg)
    if observed.copies_digest != digest:
        head = f"table ip {TABLE}\ndelete table ip {TABLE}\n"  # replaced whole, atomically
        _run(["nft", "-f", "-"], stdin=head + text)


def _apply_link(want: HandoffSpec, have: HandoffSpec | None, device: str, table: int, protocol: int) -> None:
    if have is None or have.local != want.local:
        if have is not None:
            _run(["ip", "link", "del", "dev", device])
        _run(["ip", "link", "add", device, "type", "vxlan", "id", str(VNI), "local", want.local,
              "dstport", str(PORT), "nolearning"])
        _run(["ip", "link", "set", "dev", device, "address", mac_of(want.local), "addrgenmode", "none",
              "mtu", str(want.mtu)])
        _no_rp_filter(device)
        _run(["ip", "link", "set", "dev", device, "up"])
        have = HandoffSpec(device, want.local, frozenset(), want.mtu)
    elif have.mtu != want.mtu:
        _run(["ip", "link", "set", "dev", device, "mtu", str(want.mtu)])
    ip: list[str] = []
    fdb: list[str] = []
    for p in sorted(want.peers - have.peers):
        fdb.append(f"fdb replace {mac_of(p)} dev {device} dst {p} self permanent")
        ip.append(f"neigh replace {p} lladdr {mac_of(p)} dev {device} nud permanent")
        # A copy bigger than the tunnel's MTU less VXLAN's 50 bytes goes out in
        # fragments of the outer packet (the system test's replies fill the MTU);
        # the MTU is locked so that VXLAN's path-MTU check never lowers it for
        # the copies' route (their source, in the range, would be told to
        # fragment what its own path carries whole)
        ip.append(f"route replace {p}/32 dev {device} table {table} proto {protocol} mtu lock {want.mtu}")
    for p in sorted(have.peers - want.peers):
        fdb.append(f"fdb del {mac_of(p)} dev {device} dst {p} self")
        ip.append(f"neigh del {p} dev {device}")
        ip.append(f"route del {p}/32 dev {device} table {table}")
    if fdb:
        _run(["bridge", "-force", "-batch", "-"], stdin="\n".join(fdb) + "\n", check=False)
    if ip:
        _run(["ip", "-force", "-batch", "-"], stdin="\n".join(ip) + "\n", check=False)
    got = _observe_link(device, table)
    if got is None or got.peers != want.peers:
        raise ApplyError("handoff", f"link {device}: peers {sorted(got.peers) if got else []}, "
                                    f"want {sorted(want.peers)}")
