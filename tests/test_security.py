"""Safe defaults: the embedded local Ray listens on the loopback interface only, unless asked.

Measured on real processes: the driver starts its embedded Ray, runs a task, and lists the
listening sockets of every process it started (from /proc). This also
catches the day a Ray release stops honouring the setting `launcher.keep_ray_on_loopback` uses.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

LISTENERS = """
import json, os, sys
from mnist_dist import launcher
from mnist_dist.config import TrainConfig
sys.path.insert(0, sys.argv[2])
from test_security import listening_sockets

config = TrainConfig(workers=1, expose_ray=sys.argv[1] == "expose")
launcher.keep_ray_on_loopback(config)
import ray
launcher.init_ray(config)
assert ray.get(ray.remote(lambda: 1).remote()) == 1
found = listening_sockets(os.getpid())
ray.shutdown()
print(json.dumps(found))
"""


def listening_sockets(root: int) -> list[list]:
    """[process name, address, port] of every listening TCP socket of `root` and its descendants, from /proc."""
    import os
    import socket
    import struct

    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    tree, grown = {root}, True
    while grown:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grown = bool(more)
    listening = {}  # socket inode -> (address, port)
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            raw = b"".join(struct.pack("<I", *struct.unpack(">I", raw[i:i + 4])) for i in range(0, len(raw), 4))
            ip = socket.inet_ntop(family, raw)
            listening[fields[9]] = (ip.removeprefix("::ffff:") if ip.startswith("::ffff:") else ip, int(port, 16))
    found = []
    for pid in sorted(tree):
        try:
            name = open(f"/proc/{pid}/comm").read().strip()
            inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        found += [[name, *listening[inode]] for inode in inodes if inode in listening]
    return found


LOOPBACK = ("127.0.0.1", "::1")


def listeners(mode: str) -> list[list]:
    proc = subprocess.run([sys.executable, "-c", LISTENERS, mode, str(Path(__file__).parent)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_embedded_ray_listens_on_loopback_only():
    found = listeners("default")
    names = {name for name, _ip, _port in found}
    assert {"gcs_server", "raylet"} <= names and len(found) >= 5, found  # the measurement sees Ray's servers
    assert [entry for entry in found if entry[1] not in LOOPBACK] == [], found


@pytest.mark.slow
def test_expose_ray_listens_on_every_interface():
    found = listeners("expose")
    assert any(ip not in LOOPBACK for _name, ip, _port in found), found
