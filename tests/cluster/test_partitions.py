"""The controller and a replicated partition under network partitions and frozen processes.

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
import sys
import time

import pytest

from conftest import die_with_parent, sluice_binary

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
            self.process = subprocess.Popen(args, stdout=log, stderr=log, preexec_fn=die_with_parent())

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


def partition_leader(node, topic, preferred=False):
    """The leader of partition 0 of `topic` as `node` knows it, or None; with `preferred`, only
    once its preferred replica leads (a new partition hands leadership to it within moments)."""
    result = node.cli("topic", "describe", topic, "--output", "json", timeout=20)
    if result.returncode != 0:
        return None
    partition = json.loads(result.stdout)["partitions"][0]
    if preferred and partition["leader"] != partition["replicas"][0]:
        return None
    return partition["leader"]


def client(node, *args):
    """Runs tests/cluster/netns_client.py inside `node`'s namespace."""
    helper = os.path.join(os.path.dirname(__file__), "netns_client.py")
    return subprocess.Popen(["ip", "netns", "exec", node.ns, sys.executable, helper, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def reports(path):
    lines = [json.loads(line) for line in open(path) if line.strip()]
    fatal = [line for line in lines if "fatal" in line]
    assert not fatal, fatal
    return lines


def test_a_cut_off_partition_leader_loses_nothing_acknowledged_and_its_tail_is_replaced(netns_cluster, tmp_path):
    """The leader of a replication-factor-3 partition is cut off from the other two while a
    producer writes on each side (one in the leader's namespace, bootstrapped from it alone;
    one beside the others). The cut-off side acknowledges nothing; the other side elects a
    leader and goes on; after healing, every acknowledged record is in the log exactly once at
    its acknowledged offset, nothing the cut-off side took but did not acknowledge is there,
    and the old leader's copy checksums the same as the others'."""
    nets, nodes = netns_cluster
    wait_for("a three-voter cluster", lambda: agreed_leader(nodes), 60)
    made = nodes[0].cli("topic", "create", "split", "--replication-factor", "3", timeout=60)
    for _ in range(100):  # until every node counts the others live
        if made.returncode == 0:
            break
        time.sleep(0.2)
        made = nodes[0].cli("topic", "create", "split", "--replication-factor", "3", timeout=60)
    assert made.returncode == 0, made.stderr
    by_id = {node.status()["node_id"]: node for node in nodes}

    def agreed():
        leaders = {partition_leader(node, "split", preferred=True) for node in nodes}
        return len(leaders) == 1 and None not in leaders and leaders.pop()

    victim = by_id[wait_for("a partition leader all agree on", agreed, ROUND_TIMEOUT)]
    majority = [n for n in nodes if n is not victim]
    majority_bootstrap = ",".join(n.addresses["kafka"] for n in majority)
    stop = tmp_path / "stop"
    outputs = {"majority": tmp_path / "majority.jsonl", "minority": tmp_path / "minority.jsonl"}
    # The cut-off side's producer starts first: an idempotent producer needs its producer id
    # from the controller, which it could not reach once cut off.
    producers = [client(victim, "produce", victim.addresses["kafka"], "split", "min",
                        str(outputs["minority"]), str(stop), "120")]
    try:
        wait_for("the cut-off side's producer writing",
                 lambda: outputs["minority"].exists() and outputs["minority"].read_text().count("offset") > 10,
                 ROUND_TIMEOUT)
        nets.cut(victim.index)
        cut_at = time.time()
        producers.append(client(majority[0], "produce", majority_bootstrap, "split", "maj",
                                str(outputs["majority"]), str(stop), "120"))
        try:
            def new_leader():
                leaders = {partition_leader(n, "split") for n in majority}
                return len(leaders) == 1 and None not in leaders and by_id.get(leaders.pop()) in majority
            wait_for("a partition leader on the majority side", new_leader, ROUND_TIMEOUT)
            time.sleep(5)  # both sides write
        finally:
            nets.heal(victim.index)
        healed_at = time.time()
        time.sleep(5)  # the majority's producer goes on; the old leader rejoins as a follower
    finally:
        stop.touch()
        for producer in producers:
            try:
                producer.wait(timeout=90)
            except subprocess.TimeoutExpired:
                producer.kill()
    for producer in producers:
        assert producer.returncode == 0, producer.stdout.read()

    majority_reports = reports(outputs["majority"])
    minority_reports = reports(outputs["minority"])
    acked = {r["value"]: r["offset"] for r in majority_reports + minority_reports if "offset" in r}
    failed = {r["value"]: r["error"] for r in majority_reports + minority_reports if "error" in r}
    assert sum(1 for r in majority_reports if "offset" in r) > 100, "the majority side wrote little"
    # The cut-off side committed nothing while it was cut off (acknowledgements in the first
    # moment after the cut may be of writes committed just before it).
    early = [r for r in minority_reports if "offset" in r and cut_at + 0.5 < r["at"] < healed_at]
    assert not early, early[:5]

    def settled_end():
        detail = json.loads(majority[0].cli("topic", "describe", "split", "--output", "json").stdout)
        leader = detail["partitions"][0]["leader"]
        if leader is None:
            return None
        detail = json.loads(by_id[leader].cli("topic", "describe", "split", "--output", "json").stdout)
        partition = detail["partitions"][0]
        followers = partition["followers"] or []
        caught_up = len(followers) == 2 and all(f["lag"] == 0 for f in followers)
        return caught_up and partition["high_watermark"]

    end = wait_for("every replica caught up", settled_end, ROUND_TIMEOUT)
    out = tmp_path / "read.json"
    reader = client(majority[1], "read", majority_bootstrap, "split", str(end), str(out))
    assert reader.wait(timeout=90) == 0, reader.stdout.read()
    read = json.load(open(out))
    values = [value for value, _ in read]
    assert len(values) == len(set(values)), "a record is in the log twice"
    offsets = dict(read)
    lost = {v: o for v, o in acked.items() if offsets.get(v) != o}
    assert not lost, f"acknowledged records missing or moved: {list(lost.items())[:5]}"
    # Nothing is there that its producer was not told was (or may have been) written.
    unexplained = [v for v in values if v not in acked and "TIMED_OUT" not in failed.get(v, "")]
    assert not unexplained, unexplained[:5]
    sums = []
    for node in nodes:
        result = node.cli("topic", "checksum", "split", "--to", str(end), "--output", "json")
        assert result.returncode == 0, result.stderr
        summed = json.loads(result.stdout)
        sums.append((summed["end_offset"], summed["bytes"], summed["crc32c"]))
    assert len(set(sums)) == 1, f"the copies differ: {sums}"
    # The old leader had appended what the cut-off producer sent, in its old term, and cut
    # that tail off when it rejoined.
    assert "truncating a divergent uncommitted tail" in victim.log_path.read_text(errors="replace")
    print(f"acknowledged: {sum(1 for r in majority_reports if 'offset' in r)} on the majority side, "
          f"{sum(1 for r in minority_reports if 'offset' in r)} from the cut-off side (before the cut or after "
          f"healing); "
          f"not acknowledged: {len(failed)}")
