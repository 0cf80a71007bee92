"""Where a support group's sync datagrams go: static peers and peers found by zeroconf.

DNS-SD over mDNS (python-zeroconf) announces each replica as `<group>-<node>._migrate._udp.local.`
with TXT records group, node, port (the sync port) and prefixes (comma-separated). mDNS
is link-local, so wide-area groups list static peers in the config; both may be used at
once. Liveness never comes from mDNS (a killed node's record lingers for minutes,
notes/packet-io.md §4): a record's removal only logs, and the failure detector alone says
who is dead.

A peer is an address; its node id is learned from the TXT record (zeroconf) or from the
first valid datagram that arrives from the address (static peers). A node reachable at two
addresses is sent to at one (the first learned), so it does not get every datagram twice.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable, Optional

SERVICE_TYPE = "_migrate._udp.local."
log = logging.getLogger(__name__)


class Membership:
    """The set of peer addresses to send to, from static config and zeroconf."""

    def __init__(self, node: str, group: str, sync_port: int, prefixes=("/",), static_peers=(),
                 zeroconf: bool = True, interfaces=(), on_event: Optional[Callable[[str, dict], None]] = None) -> None:
        self.node = node
        self.group = group
        self.sync_port = sync_port
        self.prefixes = tuple(prefixes)
        self.static = [tuple(p) for p in static_peers]
        self.use_zeroconf = zeroconf
        self.interfaces = list(interfaces)
        self.on_event = on_event or (lambda kind, fields: None)
        self.by_node: dict = {}  # node id -> (host, port), the address we send to
        self.node_of: dict = {}  # (host, port) -> node id, for every address a node was seen at
        self.zeroconf_records: dict = {}  # node id -> TXT properties
        self._azc = None
        self._browser = None
        self._info = None
        self._tasks: set = set()

    # -- addresses ------------------------------------------------------------------------

    def targets(self) -> list:
        """Addresses to send each datagram to: one per known node, plus static peers not yet identified."""
        out = list(self.by_node.values())
        for addr in self.static:
            if addr not in self.node_of:
                out.append(addr)
        return out

    def heard(self, node: str, addr: tuple) -> None:
        """A valid datagram from node arrived from addr: remember who lives there."""
        addr = (addr[0], addr[1])
        if node == self.node:
            return
        self.node_of[addr] = node
        if node not in self.by_node:
            self.by_node[node] = addr
            self.on_event("peer_learned", {"node": node, "addr": list(addr), "via": "datagram"})

    def _zeroconf_peer(self, node: str, addr: tuple, props: dict) -> None:
        first = node not in self.zeroconf_records
        self.zeroconf_records[node] = props
        self.node_of[addr] = node
        self.by_node.setdefault(node, addr)
        if first:  # also when its own datagrams told us about it first
            self.on_event("peer_discovered", {"node": node, "addr": list(addr), "via": "zeroconf",
                                              "prefixes": props.get("prefixes")})

    # -- zeroconf -------------------------------------------------------------------------

    async def start(self) -> None:
        if not self.use_zeroconf:
            return
        from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

        interfaces = self.interfaces or InterfaceChoice.All
        self._azc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        addresses = [socket.inet_aton(a) for a in self.interfaces] or None
        name = f"{self.group}-{self.node}.{SERVICE_TYPE}"
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, name, port=self.sync_port, addresses=addresses,
            properties={"group": self.group, "node": self.node, "port": str(self.sync_port),
                        "prefixes": ",".join(self.prefixes)},
            server=f"{self.group}-{self.node}.local.")
        # registration probes for ~1.7 s: let it run while the appliance already works
        self._spawn(self._register())

        def on_change(zeroconf, service_type, name, state_change):
            if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
                self._spawn(self._resolve(service_type, name))
            elif state_change is ServiceStateChange.Removed:
                self.on_event("zeroconf_removed", {"name": name})  # informational: liveness is not mDNS's

        self._browser = AsyncServiceBrowser(self._azc.zeroconf, SERVICE_TYPE, handlers=[on_change])

    async def _register(self) -> None:
        try:
            await self._azc.async_register_service(self._info)
            self.on_event("zeroconf_registered", {"name": self._info.name})
        except Exception as exc:  # noqa: BLE001  discovery is best effort; static peers still work
            self.on_event("zeroconf_error", {"error": repr(exc)})

    async def _resolve(self, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._azc.zeroconf, 3000):
            return
        props = {k.decode(): (v.decode() if v is not None else "") for k, v in info.properties.items()}
        if props.get("group") != self.group or props.get("node") in (None, self.node):
            return
        addrs = info.parsed_addresses()
        if not addrs:
            return
        try:
            port = int(props.get("port") or info.port)
        except ValueError:
            return
        self._zeroconf_peer(props["node"], (addrs[0], port), props)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._azc is not None:
            try:
                if self._info is not None:
                    await asyncio.wait_for(self._azc.async_unregister_service(self._info), 2)
            except Exception:  # noqa: BLE001  not registered yet, or the network is gone
                pass
            await self._azc.async_close()
        self._azc = self._browser = None

    def snapshot(self) -> dict:
        return {"targets": [list(a) for a in self.targets()], "nodes": {n: list(a) for n, a in self.by_node.items()},
                "zeroconf": self.use_zeroconf, "static": [list(a) for a in self.static]}
