"""Which TCP addresses processes listen on, from /proc (as `ss -ltnp` does): for the tests that
check what a run or the stack leaves open, and that nothing listens off loopback."""

from __future__ import annotations

import ipaddress
import os


def _address(hex_addr: str) -> str:
    """/proc/net/tcp{,6}'s little-endian hex address -> its text form (IPv4-mapped IPv6 shown as IPv4)."""
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    ip = ipaddress.IPv6Address(words)
    return str(ip.ipv4_mapped or ip)


def listening(pids) -> dict[tuple[str, int], int]:
    """{(address, port): pid} of the TCP sockets `pids` listen on."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A":                          # TCP_LISTEN
                    addr, port = cols[1].rsplit(":", 1)
                    inodes[cols[9]] = (_address(addr), int(port, 16))
    found = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                found[inodes[target[8:-1]]] = pid
    return found


def off_loopback(pids) -> dict[tuple[str, int], int]:
    """The listeners of `pids` that another machine could reach."""
    return {(a, p): pid for (a, p), pid in listening(pids).items() if not ipaddress.ip_address(a).is_loopback}


def descendants(root: int) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, set[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                raw = open(f"/proc/{name}/stat").read()
            except OSError:
                continue
            children.setdefault(int(raw[raw.rindex(")") + 2:].split()[1]), set()).add(int(name))
    out, frontier = set(), {root}
    while frontier:
        pid = frontier.pop()
        out.add(pid)
        frontier |= children.get(pid, set()) - out
    return out
