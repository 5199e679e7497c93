"""The controller under network partitions and frozen processes.

Each node runs in a network namespace of its own, joined to the others through a bridge in one
more namespace; the test creates all of them and removes them at the end. There is no default
route anywhere: traffic goes only between these namespaces (and to each one's loopback). A
partition takes a node's link to the bridge down; healing brings it back up. Every fault loop is
bounded in rounds and time.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from conftest import sluice_binary

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2",
)

PORT = 7000
ROUNDS = 3
ROUND_TIMEOUT = 40.0


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Namespaces:
    """A bridge namespace and one namespace per node, each with a veth to the bridge."""

    def __init__(self, count):
        tag = f"{os.getpid() % 10000}{random.randrange(100):02}"
        self.bridge = f"slb{tag}"
        self.names = [f"sl{tag}n{i}" for i in range(count)]
        self.subnet = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
        self.made = []

    def create(self):
        ip("netns", "add", self.bridge)
        self.made.append(self.bridge)
        ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            ip("netns", "add", name)
            self.made.append(name)
            ip("-n", name, "link", "set", "lo", "up")
            ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
            ip("link", "set", f"{name}a", "netns", name)
            ip("link", "set", f"{name}b", "netns", self.bridge)
            ip("-n", self.bridge, "link", "set", f"{name}b", "master", "br0")
            ip("-n", self.bridge, "link", "set", f"{name}b", "up")
            ip("-n", name, "addr", "add", f"{self.address(i)}/24", "dev", f"{name}a")
            ip("-n", name, "link", "set", f"{name}a", "up")
        return self

    def address(self, i):
        return f"{self.subnet}.{i + 1}"

    def cut(self, i):
        ip("-n", self.bridge, "link", "set", f"{self.names[i]}b", "down")

    def heal(self, i):
        ip("-n", self.bridge, "link", "set", f"{self.names[i]}b", "up")

    def remove(self):
        for name in reversed(self.made):
            ip("netns", "del", name, check=False)


class Node:
    def __init__(self, tmp_path, nets, index):
        self.nets = nets
        self.index = index
        self.ns = nets.names[index]
        self.host = nets.address(index)
        self.data_dir = tmp_path / f"node{index}"
        self.log_path = tmp_path / f"node{index}.log"
        self.ready = tmp_path / f"node{index}.ready"
        self.process = None
        self.addresses = {}

    def launch(self):
        if self.ready.exists():
            self.ready.unlink()
        seeds = ",".join(f"{self.nets.address(i)}:{PORT}" for i in range(len(self.nets.names)) if i != self.index)
        # The admin API on the namespace's own loopback: the default user logs in only from
        # loopback, and the command line runs in the namespace.
        http = self.addresses.get("http", "127.0.0.1:0")
        kafka = self.addresses.get("kafka", f"{self.host}:0")
        args = ["ip", "netns", "exec", self.ns, str(sluice_binary()), "serve",
                "--data-dir", str(self.data_dir), "--cluster-listen", f"{self.host}:{PORT}",
                "--cluster-seeds", seeds, "--kafka-listen", kafka,
                "--amqp-listen", f"{self.host}:0", "--http-listen", http,
                "--ready-file", str(self.ready)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=log)

    def wait_ready(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"node {self.index} exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.index} not ready; see {self.log_path}")
            time.sleep(0.05)
        self.addresses = json.loads(self.ready.read_text())

    def cli(self, *args, timeout=60):
        """The command line, run inside this node's namespace against its admin API."""
        env = dict(os.environ, SLUICE_URL="http://" + self.addresses["http"],
                   SLUICE_USER="guest", SLUICE_PASSWORD="guest")
        return subprocess.run(["ip", "netns", "exec", self.ns, str(sluice_binary()), *args],
                              capture_output=True, text=True, env=env, timeout=timeout)

    def status(self):
        result = self.cli("cluster", "status", "--output", "json", timeout=20)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()


@pytest.fixture
def netns_cluster(tmp_path):
    nets = Namespaces(3)
    nodes = []
    try:
        nets.create()
        nodes = [Node(tmp_path, nets, i) for i in range(3)]
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready()
        yield nets, nodes
    finally:
        for node in nodes:
            node.kill()
        nets.remove()


def wait_for(what, check, timeout):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def agreed_leader(nodes):
    """The leader every node in `nodes` names, with three voters, or None."""
    views = [node.status() for node in nodes]
    if any(view is None for view in views):
        return None
    leaders = {view["leader"] for view in views}
    if len(leaders) != 1 or None in leaders:
        return None
    voting = [n for n in views[0]["nodes"] if n["role"] in ("leader", "voter")]
    return views[0]["leader"] if len(voting) == 3 else None


def topics(node):
    result = node.cli("topic", "list", "--output", "json", timeout=20)
    return {t["name"] for t in json.loads(result.stdout)} if result.returncode == 0 else None


def test_a_cut_off_leader_is_replaced_and_catches_up_when_healed(netns_cluster):
    nets, nodes = netns_cluster
    by_id = {}
    wait_for("a three-voter cluster", lambda: agreed_leader(nodes), 60)
    for node in nodes:
        by_id[node.status()["node_id"]] = node
    started = time.monotonic()
    for round in range(ROUNDS):
        assert time.monotonic() - started < ROUNDS * ROUND_TIMEOUT * 2, "the campaign overran its time"
        leader_id = wait_for("an agreed leader", lambda: agreed_leader(nodes), ROUND_TIMEOUT)
        victim = by_id[leader_id]
        majority = [n for n in nodes if n is not victim]
        nets.cut(victim.index)
        cut_at = time.monotonic()
        try:
            def new_leader():
                views = [n.status() for n in majority]
                leaders = {v["leader"] for v in views if v}
                return len(leaders) == 1 and None not in leaders and leader_id not in leaders
            wait_for("a leader on the majority side", new_leader, ROUND_TIMEOUT)
            print(f"round {round}: new leader {time.monotonic() - cut_at:.2f} s after the cut")

            # The majority changes definitions; the cut-off node cannot.
            name = f"made-while-cut-{round}"
            made = majority[round % 2].cli("topic", "create", name, "--replication-factor", "1")
            assert made.returncode == 0, made.stderr
            refused = victim.cli("topic", "create", f"lost-{round}", "--replication-factor", "1", timeout=60)
            assert refused.returncode != 0, "a node without a quorum changed a definition"
        finally:
            nets.heal(victim.index)
        wait_for("the healed node to catch up", lambda: name in (topics(victim) or set()), ROUND_TIMEOUT)
        wait_for("one leader again", lambda: agreed_leader(nodes), ROUND_TIMEOUT)

    # Every node has every topic made on the majority side, and none made on a cut-off side.
    expected = {f"made-while-cut-{r}" for r in range(ROUNDS)}
    for node in nodes:
        assert topics(node) == expected


def test_a_frozen_leader_is_replaced_and_steps_down_when_thawed(netns_cluster):
    nets, nodes = netns_cluster
    wait_for("a three-voter cluster", lambda: agreed_leader(nodes), 60)
    by_id = {node.status()["node_id"]: node for node in nodes}
    for round in range(ROUNDS):
        leader_id = wait_for("an agreed leader", lambda: agreed_leader(nodes), ROUND_TIMEOUT)
        victim = by_id[leader_id]
        others = [n for n in nodes if n is not victim]
        victim.process.send_signal(signal.SIGSTOP)
        try:
            def new_leader():
                views = [n.status() for n in others]
                leaders = {v["leader"] for v in views if v}
                return len(leaders) == 1 and None not in leaders and leader_id not in leaders
            wait_for("a leader among the others", new_leader, ROUND_TIMEOUT)
            made = others[0].cli("topic", "create", f"made-while-frozen-{round}", "--replication-factor", "1")
            assert made.returncode == 0, made.stderr
        finally:
            victim.process.send_signal(signal.SIGCONT)
        wait_for("the thawed node to catch up",
                 lambda: f"made-while-frozen-{round}" in (topics(victim) or set()), ROUND_TIMEOUT)
        wait_for("one leader again", lambda: agreed_leader(nodes), ROUND_TIMEOUT)
