"""A real DNS server on loopback serving test zones (UDP and TCP).

Authoritative answers from a dict of records, built on dnspython's wire
format, in a background thread so it works from plain pytest and from
gevent-patched children alike.  It answers NXDOMAIN for unknown names, NODATA
for a known name without the asked type, follows CNAMEs inside the zone,
sets TC over UDP when an answer is larger than 512 octets (clients retry over
TCP), and can set the AD bit (``dnssec=True``) to play a validating resolver
for DANE tests.

    zones = Zones()
    zones.add("example.net", "MX", "10 mx1.example.net.")
    zones.add("mx1.example.net", "A", "127.0.0.2")
    with DnsServer(zones) as dns:
        resolvers = [f"127.0.0.1:{dns.port}"]
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections import defaultdict

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class Zones:
    """Records by (name, type); names are absolute, case-insensitive."""

    def __init__(self) -> None:
        self.records: dict[tuple[dns.name.Name, int], list[str]] = defaultdict(list)
        self.ttl = 60
        self.lock = threading.Lock()

    def add(self, name: str, rdtype: str, text: str) -> None:
        key = (dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
        with self.lock:
            self.records[key].append(text)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        qname = dns.name.from_text(name)
        with self.lock:
            for key in list(self.records):
                if key[0] == qname and (rdtype is None or key[1] == dns.rdatatype.from_text(rdtype)):
                    del self.records[key]

    def lookup(self, qname: dns.name.Name, rdtype: int) -> tuple[list[dns.rrset.RRset], bool]:
        """(answer RRsets, name exists); follows in-zone CNAMEs (at most 8)."""
        answers: list[dns.rrset.RRset] = []
        exists = False
        with self.lock:
            for _ in range(8):
                known = [key for key in self.records if key[0] == qname]
                exists = exists or bool(known)
                texts = self.records.get((qname, rdtype))
                if texts:
                    answers.append(self._rrset(qname, rdtype, texts))
                    break
                cname = self.records.get((qname, dns.rdatatype.CNAME))
                if not cname or rdtype == dns.rdatatype.CNAME:
                    break
                answers.append(self._rrset(qname, dns.rdatatype.CNAME, cname))
                qname = dns.name.from_text(cname[0])
        return answers, exists

    def _rrset(self, name: dns.name.Name, rdtype: int, texts: list[str]) -> dns.rrset.RRset:
        rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
        for text in texts:
            rrset.add(dns.rdata.from_text(dns.rdataclass.IN, rdtype, text), self.ttl)
        return rrset


class DnsServer:
    """UDP and TCP on 127.0.0.1, one free port for both."""

    def __init__(self, zones: Zones, host: str = "127.0.0.1", dnssec: bool = False) -> None:
        self.zones = zones
        self.host = host
        self.dnssec = dnssec
        self.queries: list[tuple[str, str]] = []  # (name, type) seen, for assertions
        self._udp: socketserver.ThreadingUDPServer | None = None
        self._tcp: socketserver.ThreadingTCPServer | None = None

    def answer(self, wire: bytes, max_size: int | None) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None  # not DNS: drop, as a real server would
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.dnssec:
            response.flags |= dns.flags.AD
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        self.queries.append((question.name.to_text(), dns.rdatatype.to_text(question.rdtype)))
        answers, exists = self.zones.lookup(question.name, question.rdtype)
        response.answer.extend(answers)
        if not answers and not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        data = response.to_wire()
        if max_size is not None and len(data) > max_size:
            response.answer.clear()
            response.flags |= dns.flags.TC
            data = response.to_wire()
        return data

    def start(self) -> DnsServer:
        server = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                out = server.answer(data, 512)
                if out is not None:
                    sock.sendto(out, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(5)
                try:
                    while True:
                        head = _recv_exact(sock, 2)
                        if not head:
                            return
                        out = server.answer(_recv_exact(sock, int.from_bytes(head, "big")), None)
                        if out is None:
                            return
                        sock.sendall(len(out).to_bytes(2, "big") + out)
                except OSError:
                    return

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._tcp = socketserver.ThreadingTCPServer((self.host, 0), Tcp)
        self.port = self._tcp.server_address[1]
        self._udp = socketserver.ThreadingUDPServer((self.host, self.port), Udp)
        for srv in (self._udp, self._tcp):
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return buf
