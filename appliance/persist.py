"""The server appliance's stream map across its own restart (its HTTP server living on).

A restarted server appliance has an empty stream mapper, and its tap cannot rebuild what it
missed: a download in progress shows the tap nothing but pure ACKs, which its filter does not
admit. So every connection it advertises is journaled (appliance.journal) with where its two
byte streams stood: the next client byte the mapper expected and the server byte after which
no response was known to begin. At start each journaled connection is checked against the
kernel's own socket (appliance.sockdiag): gone means closed meanwhile; bytes received from
the client beyond what the mapper had seen, or bytes written by the server beyond the
response it knew, mean the connection moved on while nobody watched: it is restored RESET
(a takeover resets the client instead of splicing into an unknown response). Otherwise it is
adopted back into the mapper exactly as it was, and advertised again under the new epoch.

    j = StreamMapJournal(path)
    for r in j.reconcile(sockdiag.find): mapper.adopt(r.entry, r.rcv, r.snd, now) ...
    j.note(conn, entry) / j.drop(key)
"""

from __future__ import annotations

import socket
from dataclasses import fields, replace
from typing import Callable, List, NamedTuple, Optional

import _fastpath as fp

from .journal import Journal
from .sync import ENTRY_FIELDS, Entry, ObjectRef

__all__ = ["entry_record", "entry_from_record", "StreamMapJournal", "Restored", "check"]

_MASK = 0xFFFFFFFF
_OBJ_FIELDS = tuple(f.name for f in fields(ObjectRef))
_BYTES = ("client_ip", "server_ip")


def entry_record(e: Entry) -> dict:
    """An Entry as JSON-able data (addresses and digests as hex)."""
    d = {n: getattr(e, n) for n in ENTRY_FIELDS}
    for n in _BYTES:
        d[n] = d[n].hex()
    o = e.object
    if o is not None:
        d["object"] = {n: getattr(o, n) for n in _OBJ_FIELDS}
        if o.digest is not None:
            d["object"]["digest"] = o.digest.hex()
    return d


def entry_from_record(d: dict) -> Entry:
    """The Entry of entry_record() (ValueError/KeyError/TypeError when it is not one)."""
    d = dict(d)
    for n in _BYTES:
        d[n] = bytes.fromhex(d[n])
    if d.get("object") is not None:
        o = dict(d["object"])
        if o.get("digest") is not None:
            o["digest"] = bytes.fromhex(o["digest"])
        d["object"] = ObjectRef(**o)
    return Entry(**d)


class Restored(NamedTuple):
    """A journaled connection that still exists: adopt it with these, then set its bases."""

    entry: Entry
    rcv: int
    snd: int
    rcv_base: int
    snd_base: int
    why: Optional[str]  # None: exactly as journaled; else why it is restored RESET


def _jkey(key) -> tuple:
    """A connection key as the journal keeps it (JSON has no bytes)."""
    return (key[0].hex(), key[1], key[2].hex(), key[3])


def _text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def check(record: dict, sock) -> Optional[str]:
    """Why the journaled connection no longer is what the record says (None: it is), given
    the kernel's socket for it (a sockdiag.TcpSocket, or None when there is none)."""
    if sock is None:
        return "closed"
    if sock.state_name != "ESTABLISHED":
        return f"closing ({sock.state_name})"
    if sock.bytes_received is None or sock.bytes_acked is None:
        return "no tcp_info to check it against"
    got = (record["rcv_base"] + sock.bytes_received) & _MASK
    if got != record["rcv"]:
        return f"the client sent {fp.seq_diff(got, record['rcv'])} bytes the tap did not see"
    written = (record["snd_base"] + sock.bytes_acked + sock.wqueue) & _MASK
    if fp.seq_gt(written, record["snd"]):
        return f"the server wrote {fp.seq_diff(written, record['snd'])} bytes past the response the tap knew"
    return None


class StreamMapJournal:
    """The journal of what this server appliance advertises (see the module docstring)."""

    def __init__(self, path) -> None:
        self.journal = Journal(path)
        self.counters = {"restored": 0, "restored_reset": 0, "dropped": 0, "bad": 0}

    def note(self, conn, entry: Entry) -> None:
        """conn (a streammap.Connection) is advertised as `entry` now."""
        if conn.stream is None or conn.rcv_base is None or conn.snd_base is None:
            return
        snd = conn.resp_min_seq if conn.resp_min_seq is not None else conn.snd_base
        self.journal.put(_jkey(entry.key), {"entry": entry_record(entry), "rcv": conn.stream.next, "snd": snd,
                                           "rcv_base": conn.rcv_base, "snd_base": conn.snd_base})
        self.journal.flush()

    def drop(self, key) -> None:
        self.journal.drop(_jkey(key))
        self.journal.flush()

    def reconcile(self, find: Callable, now_reason: str = "changed while the server appliance was down"
                  ) -> List[Restored]:
        """The journaled connections that still exist (their `why` is None when exactly as
        journaled, else the entry is RESET with that reason). find(local, remote) ->
        sockdiag.TcpSocket or None."""
        out = []
        for key, rec in self.journal.load().items():
            try:
                entry = entry_from_record(rec["entry"])
                sock = find((_text(entry.server_ip), entry.server_port), (_text(entry.client_ip), entry.client_port))
                why = check(rec, sock)
            except Exception:  # noqa: BLE001  a record that does not parse, a lookup that fails
                self.counters["bad"] += 1
                self.journal.drop(key)
                continue
            if why == "closed" or (why or "").startswith("closing"):
                self.counters["dropped"] += 1
                self.journal.drop(key)
                continue
            if why is not None:
                entry = replace(entry, state="RESET", object=None if entry.state == "IDLE" else entry.object,
                                reason=f"{now_reason}: {why}")
                self.counters["restored_reset"] += 1
            self.counters["restored"] += 1
            out.append(Restored(entry, rec["rcv"], rec["snd"], rec["rcv_base"], rec["snd_base"], why))
        self.journal.flush()
        return out

    def close(self) -> None:
        self.journal.close()
