"""Quiet partitions on three real `sluice` processes: a replicated partition nobody writes to
goes quiet on every replica (no heartbeats, no timers), counts its followers in sync while
their nodes answer, takes the next write at the first attempt (its leader wakes, renews its
lease and its in-sync count first), and fails over when its leader is killed or frozen while
quiet — the followers' node liveness wakes them — losing nothing acknowledged.
"""

import base64
import json
import signal
import time
import urllib.request

from test_cluster import FORM_TIMEOUT, live_brokers, nodes_factory, settled, wait_for  # noqa: F401
from test_replicated_partitions import node_of, partition_state, read_back, three_nodes

# Groups go quiet after one to two housekeeping periods without a write; a follower is in
# sync while it answered the leader within 1.5 s (or, quiet, while its node answers pings).
ENV = {"SLUICE_STORAGE__HOUSEKEEPING_INTERVAL_MS": "1000", "SLUICE_KAFKA__REPLICA_LAG_TIME_MAX_MS": "1500"}
# Longer than the leader's lease (the largest election timeout, 1 s) and the in-sync lag.
QUIET_FOR = 3


def described(node, topic):
    """Partition 0 of `topic` as `node`'s admin API describes it (None when it cannot say)."""
    request = urllib.request.Request(f"{node.http}/api/topics/{topic}")
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            partitions = json.loads(response.read())["partitions"]
    except OSError:
        return None
    return next(p for p in partitions if p["partition"] == 0)


def quiet_on(node, topic):
    """Whether `node`'s replica of partition 0 of `topic` is quiet (False when it cannot say)."""
    partition = described(node, topic)
    return partition is not None and partition["quiet"] is True


def wait_quiet(nodes, topic):
    wait_for(f"{topic} quiet on nodes {[n.http for n in nodes]}",
             lambda: all(quiet_on(node, topic) for node in nodes), timeout=30, interval=0.2)


def produce(bootstrap, topic, values, **settings):
    """Produces `values` to partition 0 with acks=all; the delivery errors."""
    from confluent_kafka import Producer

    errors = []

    def delivered(error, message):
        if error is not None:
            errors.append(str(error))

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "message.timeout.ms": 30000,
                         **settings})
    for value in values:
        producer.produce(topic, str(value).encode(), partition=0, on_delivery=delivered)
    assert producer.flush(40) == 0
    return errors


def test_idle_partitions_go_quiet_wake_for_writes_and_fail_over(nodes_factory):
    from confluent_kafka.admin import AdminClient, NewTopic

    cluster, bootstrap, admin = three_nodes(nodes_factory, env=ENV)
    admin.create_topics([
        NewTopic("quiet", num_partitions=1, replication_factor=3, config={"min.insync.replicas": "2"}),
        NewTopic("strict", num_partitions=1, replication_factor=3, config={"min.insync.replicas": "3"}),
    ])["quiet"].result(30)
    wait_for("both topics led", lambda: partition_state(admin, "quiet") and partition_state(admin, "strict"),
             timeout=30)
    assert produce(bootstrap, "quiet", range(0, 10), **{"enable.idempotence": True}) == []
    assert produce(bootstrap, "strict", range(0, 10)) == []

    # Idle: quiet on every replica, and the followers still count in sync.
    wait_quiet(cluster.nodes, "quiet")
    wait_quiet(cluster.nodes, "strict")
    time.sleep(QUIET_FOR)
    for topic in ("quiet", "strict"):
        leader, replicas, isr = partition_state(admin, topic)
        assert isr == replicas and len(isr) == 3, (topic, leader, replicas, isr)

    # The first write after quiet succeeds at the first attempt, also where all three replicas
    # must be in sync: no lease expired, no follower counted out.
    assert produce(bootstrap, "strict", range(10, 20), retries=0) == []
    assert produce(bootstrap, "quiet", range(10, 20), retries=0) == []

    # A follower killed and restarted while quiet: its leader wakes when its node goes silent,
    # so the restarted follower hears heartbeats at once and does not campaign.
    wait_quiet(cluster.nodes, "quiet")
    leader_id = partition_state(admin, "quiet")[0]
    leader = node_of(cluster, admin, leader_id)
    epoch = described(leader, "quiet")["epoch"]
    follower = next(node for node in cluster.nodes if node is not leader)
    follower.kill()
    time.sleep(QUIET_FOR)
    follower.launch()
    follower.wait_ready(FORM_TIMEOUT)
    wait_quiet(cluster.nodes, "quiet")
    after = described(leader, "quiet")
    assert (after["leader"], after["epoch"]) == (leader_id, epoch), after

    # Killed while quiet: the followers notice its node is gone and elect another leader.
    wait_quiet(cluster.nodes, "quiet")
    leader_id = partition_state(admin, "quiet")[0]
    victim = node_of(cluster, admin, leader_id)
    others = [node for node in cluster.nodes if node is not victim]
    survivors = AdminClient({"bootstrap.servers": ",".join(node.kafka for node in others)})
    victim.kill()
    wait_for("a new leader after the kill", lambda: (s := partition_state(survivors, "quiet")) and s[0] != leader_id,
             timeout=20, interval=0.1)
    assert produce(bootstrap, "quiet", range(20, 30), **{"enable.idempotence": True}) == []
    victim.launch()
    victim.wait_ready(FORM_TIMEOUT)
    wait_for("three live brokers", lambda: all(live_brokers(n) == 3 for n in cluster.nodes), timeout=30)

    # Frozen while quiet: the same, and once thawed it follows and goes quiet again.
    wait_quiet(cluster.nodes, "quiet")
    leader_id = partition_state(admin, "quiet")[0]
    frozen = node_of(cluster, admin, leader_id)
    others = [node for node in cluster.nodes if node is not frozen]
    survivors = AdminClient({"bootstrap.servers": ",".join(node.kafka for node in others)})
    frozen.process.send_signal(signal.SIGSTOP)
    try:
        wait_for("a new leader while the old one is frozen",
                 lambda: (s := partition_state(survivors, "quiet")) and s[0] != leader_id, timeout=20, interval=0.1)
        assert produce(",".join(node.kafka for node in others), "quiet", range(30, 40),
                       **{"enable.idempotence": True}) == []
    finally:
        frozen.process.send_signal(signal.SIGCONT)
    wait_quiet(cluster.nodes, "quiet")

    read = read_back(bootstrap, "quiet", 40)
    values = [value for value, _ in read]
    assert sorted(values) == list(range(40)), values
