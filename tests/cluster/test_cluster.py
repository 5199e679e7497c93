"""Real `sluice` processes forming a cluster on loopback, each node on its own 127.0.0.x address.

The nodes find each other through their seeds, form a three-voter controller group whatever the
order they start in, replicate every definition through it, survive the controller leader's
SIGKILL, catch up after a restart (from a snapshot once the log was compacted), and refuse nodes
that present an id the cluster already has. A node started to wait for an invitation joins when
`sluice cluster add-node` names it.
"""

import base64
import json
import socket
import time
import urllib.request

import pytest

from conftest import Sluice, run_cli as cli

# Generous bounds: these are not targets (failover time is measured and recorded in
# docs/reliability.md), only how long a test waits before it calls something broken.
FORM_TIMEOUT = 60.0
FAILOVER_TIMEOUT = 15.0


def free_port(hosts):
    """A TCP port free on every one of `hosts`, below the kernel's ephemeral range (so no
    listener on port 0 and no outgoing connection takes it between this check and the bind)."""
    import random

    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    for _ in range(200):
        port = random.randrange(10_000, max(low, 10_001))
        try:
            for host in hosts:
                with socket.socket() as probe:
                    probe.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every host")


class Nodes:
    """Cluster nodes on 127.0.0.2, .3, ... with fixed cluster ports and each other as seeds."""

    def __init__(self, tmp_path, count, env=None):
        self.tmp_path = tmp_path
        self.env = env or {}
        self.hosts = [f"127.0.0.{2 + i}" for i in range(count)]
        self.port = free_port(self.hosts + ["127.0.0.9"])
        self.nodes = [self.make(i, self.hosts) for i in range(count)]

    def address(self, host):
        return f"{host}:{self.port}"

    def make(self, index, seed_hosts, name=None, extra=()):
        host = f"127.0.0.{2 + index}"
        seeds = ",".join(self.address(h) for h in seed_hosts if h != host)
        args = ["--cluster-listen", self.address(host), *extra]
        if seeds:
            args += ["--cluster-seeds", seeds]
        name = name or f"node{index}"
        return Sluice(self.tmp_path / name, self.tmp_path / f"{name}.log", args, self.env, host)

    def start(self, order=None, pause=0.3):
        for i in order or range(len(self.nodes)):
            self.nodes[i].launch()
            time.sleep(pause)
        for node in self.nodes:
            node.wait_ready(FORM_TIMEOUT)
        return self

    def restart_all(self):
        """Stops every node (SIGTERM), then starts them all again (they need each other to be
        ready) and waits until each is."""
        for node in self.nodes:
            node.stop()
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_ready(FORM_TIMEOUT)

    def kill_all(self):
        for node in self.nodes:
            node.kill()


@pytest.fixture
def nodes_factory(tmp_path):
    made = []

    def make(count=3, env=None):
        nodes = Nodes(tmp_path, count, env)
        made.append(nodes)
        return nodes

    yield make
    for nodes in made:
        nodes.kill_all()


def status(node):
    request = urllib.request.Request(node.http + "/api/cluster")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_for(what, check, timeout=FORM_TIMEOUT, interval=0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, ValueError, KeyError) as error:
            last = error
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def roles(view):
    return {node["id"]: node["role"] for node in view["nodes"]}


def settled(nodes, count):
    """Every node reports the same leader and `count` registered members with votes, or None."""
    views = [status(node) for node in nodes]
    leaders = {view["leader"] for view in views}
    if len(leaders) != 1 or None in leaders:
        return None
    for view in views:
        voting = [r for r in roles(view).values() if r in ("leader", "voter")]
        if len(voting) != count or not view["from_leader"]:
            return None
        # Each node registers its addresses once it belongs.
        if any(node["kafka_addr"] is None for node in view["nodes"]):
            return None
    return views


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)])
def test_three_nodes_form_from_their_seeds_in_any_order(nodes_factory, order):
    cluster = nodes_factory(3).start(order=order)
    views = wait_for("a three-voter cluster", lambda: settled(cluster.nodes, 3))
    assert len({view["cluster_id"] for view in views}) == 1
    ids = {view["node_id"] for view in views}
    assert len(ids) == 3
    assert set(roles(views[0])) == ids
    # Every node lists every node with its addresses as it advertises them.
    for view in views:
        by_id = {node["id"]: node for node in view["nodes"]}
        for node, own in zip(cluster.nodes, views):
            entry = by_id[own["node_id"]]
            assert entry["cluster_addr"] == cluster.address(node.host)
            assert entry["kafka_addr"] == node.kafka
            assert entry["amqp_addr"] == node.amqp

    # Kafka clients see the controller group as KRaft's metadata quorum.
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=cluster.nodes[2].kafka)
    quorum = admin.describe_metadata_quorum()["topics"][0]["partitions"][0]
    admin.close()
    assert quorum["leader_id"] == views[0]["leader"]
    assert {v["replica_id"] for v in quorum["current_voters"]} == ids
    assert quorum["high_watermark"] > 0

    # The command line and the API agree.
    through_cli = json.loads(cli(cluster.nodes[1], "cluster", "status", "--output", "json").stdout)
    assert through_cli["cluster_id"] == views[0]["cluster_id"]
    assert roles(through_cli) == roles(status(cluster.nodes[1]))
    table = cli(cluster.nodes[1], "cluster", "status").stdout
    for node_id in ids:
        assert str(node_id) in table

    # A fourth node, started without seeds to wait for an invitation, is added through one
    # node's command line and joins as a voter (fewer than five vote).
    fourth = cluster.make(3, [], name="node3", extra=["--cluster-wait-for-invite"])
    cluster.nodes.append(fourth)
    fourth.launch()
    fourth_address = cluster.address(fourth.host)

    def listening():
        with socket.create_connection((fourth.host, cluster.port), timeout=1):
            return True

    wait_for("the fourth node's cluster listener", listening)
    added = cli(cluster.nodes[2], "cluster", "add-node", fourth_address).stdout
    fourth.wait_ready(FORM_TIMEOUT)
    views = wait_for("a fourth voter", lambda: settled(cluster.nodes, 4))
    fourth_id = status(fourth)["node_id"]
    assert f"added node {fourth_id} at {fourth_address}" in added
    assert fourth_id in roles(views[0])
    # A member cannot be added again.
    again = cli(cluster.nodes[0], "cluster", "add-node", fourth_address, check=False)
    assert again.returncode != 0 and "already in the cluster" in again.stderr

    # Then it is removed through another node's command line.
    removed = cli(cluster.nodes[1], "cluster", "remove-node", str(fourth_id)).stdout
    assert f"removed node {fourth_id}" in removed
    cluster.nodes.pop()
    fourth.kill()
    views = wait_for("three voters again", lambda: settled(cluster.nodes, 3))
    assert fourth_id not in roles(views[0])
    # Its id is retired: removing it again is refused with a clear error.
    again = cli(cluster.nodes[0], "cluster", "remove-node", str(fourth_id), check=False)
    assert again.returncode != 0 and "not in the cluster" in again.stderr


def test_definitions_made_on_one_node_are_on_every_node_and_survive_restarts(nodes_factory):
    cluster = nodes_factory(3).start()
    a, b, c = cluster.nodes
    wait_for("a three-voter cluster", lambda: settled(cluster.nodes, 3))

    cli(b, "topic", "create", "orders", "--partitions", "12", "--replication-factor", "1")
    cli(a, "queue", "declare", "jobs")
    cli(c, "exchange", "declare", "events", "--type", "topic")
    cli(a, "binding", "add", "events", "jobs", "--routing-key", "job.*")
    cli(c, "user", "add", "alice", "s3cret")

    def everywhere():
        for node in cluster.nodes:
            topics = json.loads(cli(node, "topic", "list", "--output", "json").stdout)
            if [(t["name"], t["partitions"]) for t in topics] != [("orders", 12)]:
                return False
            queues = json.loads(cli(node, "queue", "list", "--output", "json").stdout)
            if "jobs" not in {q["name"] for q in queues}:
                return False
            bindings = json.loads(cli(node, "binding", "list", "--output", "json").stdout)
            if not any(x["source"] == "events" and x["destination"] == "jobs" for x in bindings):
                return False
            users = json.loads(cli(node, "user", "list", "--output", "json").stdout)
            if "alice" not in {u["name"] for u in users}:
                return False
        return True

    wait_for("the definitions on every node", everywhere, timeout=20)

    # A refusal is the same wherever it is asked: the topic exists on every node.
    again = cli(c, "topic", "create", "orders", "--partitions", "3", check=False)
    assert again.returncode != 0 and "exists" in again.stderr

    cluster.restart_all()
    wait_for("the definitions after a restart", everywhere, timeout=20)


def test_the_controller_survives_its_leaders_sigkill_and_a_restarted_node_catches_up(nodes_factory):
    # A snapshot every 20 entries: the log a killed node misses is compacted while it is down.
    cluster = nodes_factory(3, env={"SLUICE_CLUSTER__SNAPSHOT_ENTRIES": "20"}).start()
    views = wait_for("a three-voter cluster", lambda: settled(cluster.nodes, 3))
    leader_id = views[0]["leader"]
    by_id = {view["node_id"]: node for view, node in zip(views, cluster.nodes)}
    leader = by_id[leader_id]
    survivors = [node for node in cluster.nodes if node is not leader]

    leader.kill()
    killed_at = time.monotonic()

    def new_leader():
        views = [status(node) for node in survivors]
        leaders = {view["leader"] for view in views}
        return len(leaders) == 1 and None not in leaders and leader_id not in leaders

    wait_for("a new controller leader", new_leader, timeout=FAILOVER_TIMEOUT, interval=0.02)
    print(f"new controller leader {time.monotonic() - killed_at:.2f} s after SIGKILL")

    # Definitions still change, through either survivor.
    for i in range(60):
        cli(survivors[i % 2], "topic", "create", f"t{i:02}", "--replication-factor", "1")

    leader.start(timeout=FORM_TIMEOUT)

    def caught_up():
        topics = json.loads(cli(leader, "topic", "list", "--output", "json").stdout)
        return len(topics) == 60

    wait_for("the restarted node to catch up", caught_up, timeout=30)
    # It caught up from a snapshot: the entries it missed were purged from the leader's log.
    assert "installed a snapshot from the leader" in leader.log_path.read_text(errors="replace")
    views = wait_for("three voters again", lambda: settled(cluster.nodes, 3))
    assert views[0]["leader"] is not None


def test_a_node_with_an_id_the_cluster_has_is_refused(nodes_factory, tmp_path):
    cluster = nodes_factory(3).start()
    views = wait_for("a three-voter cluster", lambda: settled(cluster.nodes, 3))
    victim = cluster.nodes[2]
    identity = json.loads((victim.data_dir / "cluster" / "node.json").read_text())
    victim.kill()

    # Its data directory wiped but for its identity: refused at start, saying why.
    for entry in (victim.data_dir / "cluster").iterdir():
        if entry.name != "node.json":
            import shutil

            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    victim.launch()
    assert victim.process.wait(timeout=30) != 0
    assert "wiped" in victim.log_path.read_text(errors="replace")

    # A new data directory presenting the id of a live node (and no cluster id): refused too.
    impostor = cluster.make(4, [cluster.hosts[0]], name="impostor")
    (impostor.data_dir / "cluster").mkdir(parents=True)
    (impostor.data_dir / "cluster" / "node.json").write_text(
        json.dumps({"node_id": views[0]["node_id"], "cluster_id": None}))
    cluster.nodes.append(impostor)
    impostor.launch()
    assert impostor.process.wait(timeout=60) != 0
    log = impostor.log_path.read_text(errors="replace")
    assert "refused" in log, log[-2000:]


def test_kafka_clients_reach_every_partition_through_any_node(nodes_factory):
    """A topic created through node B, a producer that knows only node A, a consumer group of
    three each bootstrapped from a different node: every record read exactly once, in order
    per key, and the partitions' data spread over the three nodes."""
    import shutil
    import subprocess
    import threading

    from confluent_kafka import Consumer, Producer

    cluster = nodes_factory(3).start()
    a, b, c = cluster.nodes
    wait_for("a three-voter cluster", lambda: settled(cluster.nodes, 3))
    # New partitions go to the nodes that answer: wait until B counts the others live.
    wait_for("three live brokers", lambda: live_brokers(b) == 3, timeout=20)
    cli(b, "topic", "create", "orders", "--partitions", "12", "--replication-factor", "1")

    if shutil.which("kcat"):
        # Each node counts the others live once they answer its pings (twice a second).
        def listing():
            out = subprocess.run(["kcat", "-b", a.kafka, "-L", "-t", "orders"], capture_output=True,
                                 text=True, timeout=30).stdout
            return out if " 3 brokers:" in out and "Leader not available" not in out else None

        out = wait_for("kcat -L to list three brokers", listing, timeout=20)
        assert 'topic "orders" with 12 partitions' in out, out

    total, keys = 100_000, 500
    assigned = [threading.Event() for _ in range(3)]
    received = [[] for _ in range(3)]
    done = threading.Event()
    failures = []

    def consume(slot, node):
        consumer = Consumer({"bootstrap.servers": node.kafka, "group.id": "readers",
                             "auto.offset.reset": "earliest", "enable.auto.commit": True,
                             "auto.commit.interval.ms": 200, "session.timeout.ms": 10000})
        try:
            consumer.subscribe(["orders"], on_assign=lambda c, parts: assigned[slot].set() if parts else None)
            while not done.is_set():
                message = consumer.poll(0.2)
                if message is None:
                    continue
                if message.error():
                    failures.append(str(message.error()))
                    continue
                received[slot].append((message.key().decode(), int(message.value()), message.partition()))
        except Exception as error:  # reported by the test thread
            failures.append(repr(error))
        finally:
            consumer.close()

    threads = [threading.Thread(target=consume, args=(i, node)) for i, node in enumerate(cluster.nodes)]
    for thread in threads:
        thread.start()
    try:
        # Produce only once the group has settled with three members, so no rebalance moves a
        # partition while records flow (a moved partition may be read again before a commit).
        wait_for("three consumers with partitions", lambda: all(e.is_set() for e in assigned), timeout=60)
        wait_for("a settled assignment", lambda: stable_assignment(cluster.nodes, "readers"), timeout=60)
        producer = Producer({"bootstrap.servers": a.kafka, "acks": "all", "enable.idempotence": True,
                             "linger.ms": 5})
        for i in range(total):
            key = f"k{i % keys}"
            producer.produce("orders", key=key, value=str(i // keys).encode())
            if i % 10_000 == 0:
                producer.poll(0)
        assert producer.flush(60) == 0

        wait_for("every record consumed", lambda: sum(map(len, received)) >= total, timeout=120)
        time.sleep(1)  # anything beyond `total` would be a duplicate
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not failures, failures[:5]

    everything = [record for part in received for record in part]
    assert len(everything) == total
    per_key = {}
    partition_of = {}
    for part in received:
        for key, sequence, partition in part:
            per_key.setdefault(key, []).append(sequence)
            assert partition_of.setdefault(key, partition) == partition, "a key moved partition"
    assert len(per_key) == keys
    for key, sequences in per_key.items():
        assert sequences == list(range(total // keys)), f"{key}: out of order or not exactly once"

    # The records are on the three nodes, each holding the partitions placed on it.
    held = []
    for node in cluster.nodes:
        detail = json.loads(cli(node, "topic", "describe", "orders", "--output", "json").stdout)
        held.append(sum(p["high_watermark"] or 0 for p in detail["partitions"]))
    assert sum(held) == total and all(h > 0 for h in held), held


def live_brokers(node):
    """How many brokers `node` tells Kafka clients about (the live ones)."""
    from confluent_kafka.admin import AdminClient

    return len(AdminClient({"bootstrap.servers": node.kafka}).list_topics(timeout=10).brokers)


def stable_assignment(nodes, group):
    """Whether `group` is Stable with three members, each with partitions, on its coordinator
    (whichever node that is)."""
    for node in nodes:
        result = cli(node, "group", "describe", group, "--output", "json", check=False)
        if result.returncode != 0:
            continue
        out = json.loads(result.stdout)
        members = out.get("members") or []
        if out.get("state") == "Stable" and len(members) == 3 and all(m["assignment"] for m in members):
            return True
    return False


def test_a_node_that_is_down_takes_its_partitions_away_until_it_returns(nodes_factory):
    import shutil
    import subprocess

    from confluent_kafka import Consumer, Producer

    if not shutil.which("kcat"):
        pytest.skip("kcat is installed by scripts/test")
    cluster = nodes_factory(3).start()
    a, b, c = cluster.nodes
    wait_for("a three-voter cluster", lambda: settled(cluster.nodes, 3))
    wait_for("three live brokers", lambda: live_brokers(a) == 3, timeout=20)
    cli(a, "topic", "create", "events", "--partitions", "6", "--replication-factor", "1")

    def metadata():
        out = subprocess.run(["kcat", "-b", a.kafka, "-L", "-J", "-t", "events"], capture_output=True,
                             text=True, timeout=30).stdout
        return json.loads(out) if out else None

    full = wait_for("three brokers", lambda: (m := metadata()) and len(m["brokers"]) == 3 and m, timeout=20)
    c_id = status(c)["node_id"]
    on_c = {p["partition"] for p in full["topics"][0]["partitions"] if p["leader"] == c_id}
    assert on_c, "no partition placed on the node to stop"

    producer = Producer({"bootstrap.servers": a.kafka, "acks": "all"})
    for i in range(600):
        producer.produce("events", key=f"k{i % 60}", value=f"v{i}")
    assert producer.flush(30) == 0

    c.kill()

    def without_c():
        m = metadata()
        if not m or len(m["brokers"]) != 2:
            return None
        parts = {p["partition"]: p for p in m["topics"][0]["partitions"]}
        unavailable = {i for i, p in parts.items() if p["leader"] == -1}
        return m if unavailable == on_c else None

    wait_for("the stopped node's partitions to be unavailable", without_c, timeout=20)
    # While C is down, a manual assignment may not name it; one naming a live node is kept.
    from kafka.admin import KafkaAdminClient
    from kafka.admin import NewTopic as AssignedTopic
    from kafka.errors import InvalidReplicationAssignmentError

    admin = KafkaAdminClient(bootstrap_servers=a.kafka)
    a_id = status(a)["node_id"]
    with pytest.raises(InvalidReplicationAssignmentError, match="not a live broker"):
        admin.create_topics([AssignedTopic("on-c", -1, -1, replica_assignments={0: [c_id]})])
    admin.create_topics([AssignedTopic("on-a", -1, -1, replica_assignments={0: [a_id], 1: [a_id]})])
    admin.close()
    pinned = json.loads(cli(b, "topic", "describe", "on-a", "--output", "json").stdout)
    assert [p["leader"] for p in pinned["partitions"]] == [a_id, a_id]
    c.start(timeout=FORM_TIMEOUT)
    wait_for("three brokers again", lambda: (m := metadata()) and len(m["brokers"]) == 3
             and all(p["leader"] != -1 for p in m["topics"][0]["partitions"]), timeout=20)

    consumer = Consumer({"bootstrap.servers": b.kafka, "group.id": "after", "auto.offset.reset": "earliest"})
    consumer.subscribe(["events"])
    values = []
    deadline = time.monotonic() + 60
    while len(values) < 600 and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and not message.error():
            values.append(message.value().decode())
    consumer.close()
    assert sorted(values) == sorted(f"v{i}" for i in range(600))
