"""Damaged partition data on three real `sluice` processes: damage is never served, and a
replica rebuilds it from the other replicas.

A follower's copy loses a sealed segment and has a byte flipped in another while it is down:
opening meets the missing segment, checks every sealed segment, and rebuilds both before the
replica opens. A byte flipped in a sealed segment of the running follower is rebuilt when a read
meets it (here `sluice topic checksum`, which fails once naming the file). Then a byte is
flipped in a sealed segment of the running leader: a consumer reading from the start gets a
storage error for those offsets (never the damaged records) until the leader has rebuilt the
segment from a follower, and then reads every record, once and in order. Afterwards every
copy checksums the same.
"""

import json
import time

from test_cluster import FORM_TIMEOUT, nodes_factory, wait_for  # noqa: F401
from test_replicated_partitions import node_of, partition_state, preferred_leads, three_nodes

TOPIC = "damaged"
RECORDS = 3000


def copy_dir(node):
    return node.data_dir / "logs" / f"{TOPIC}-0"


def sealed_segments(node):
    """The copy's segment files but the last (active) one, in offset order."""
    return sorted(copy_dir(node).glob("*.log"))[:-1]


def flip(path, at):
    with open(path, "r+b") as file:
        file.seek(at)
        byte = file.read(1)
        file.seek(at)
        file.write(bytes([byte[0] ^ 0x20]))


def checksum(node, topic, end):
    """A copy's checksum of partition 0 up to `end` (without the node's id, so that copies
    compare), or the error the command line printed."""
    from conftest import run_cli as cli

    answer = cli(node, "topic", "checksum", topic, "--partition", "0", "--to", str(end),
                 "--output", "json", check=False)
    if answer.returncode != 0:
        return answer.stderr + answer.stdout
    summed = json.loads(answer.stdout)
    summed.pop("node")
    return summed


def high_watermark(node, topic):
    """Partition 0's high watermark as `node` describes it."""
    from conftest import run_cli as cli

    described = json.loads(cli(node, "topic", "describe", topic, "--output", "json").stdout)
    return described["partitions"][0]["high_watermark"]


def numbered_producer(bootstrap, topic, filler):
    """A function that writes records `first` to `first + count - 1` of partition 0 (an
    idempotent acks=all producer; each record its number, ':' and 60 `filler` bytes) and
    answers how many were not acknowledged."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                         "enable.idempotence": True, "message.timeout.ms": 20000})

    def produce(first, count):
        for i in range(first, first + count):
            producer.produce(topic, b"%d:" % i + filler * 60, partition=0)
            producer.poll(0)
        return producer.flush(30)

    return produce


def rf3_topic(cluster, admin, topic, config=None):
    """Creates `topic` (one partition, three replicas) and waits until its preferred replica
    leads (leadership may move once after creation): the leader's id, its node and a
    follower's node."""
    from confluent_kafka.admin import NewTopic

    from confluent_kafka import KafkaError, KafkaException

    def create():
        new = NewTopic(topic, num_partitions=1, replication_factor=3, config=config or {})
        try:
            return admin.create_topics([new])[topic].result(30) or True
        except KafkaException as e:
            # Twice in CI a node counted only two live brokers for a moment right after the
            # cluster formed (Kafka answers the same while brokers register): asked again.
            if e.args[0].code() == KafkaError.INVALID_REPLICATION_FACTOR:
                return None
            raise

    wait_for(f"{topic} created", create, timeout=15, interval=0.5)
    wait_for("the preferred replica to lead", lambda: preferred_leads(admin, topic), timeout=30)
    leader_id, replicas, _ = wait_for("a leader", lambda: partition_state(admin, topic), timeout=30)
    follower_id = next(r for r in replicas if r != leader_id)
    return leader_id, node_of(cluster, admin, leader_id), node_of(cluster, admin, follower_id)


def test_damaged_and_missing_segments_are_rebuilt_from_the_other_replicas(nodes_factory):
    from confluent_kafka import Consumer, Producer, TopicPartition

    from conftest import run_cli as cli

    cluster, bootstrap, admin = three_nodes(nodes_factory)
    _, leader, follower = rf3_topic(cluster, admin, TOPIC, {"segment.bytes": "16384"})
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                         "batch.size": 4096, "enable.idempotence": True})
    for i in range(RECORDS):
        producer.produce(TOPIC, b"%d:" % i + b"x" * 60, partition=0)
        producer.poll(0)
    assert producer.flush(30) == 0

    def describe(node):
        return json.loads(cli(node, "topic", "describe", TOPIC, "--output", "json").stdout)["partitions"][0]

    end = describe(leader)["high_watermark"]
    assert end >= RECORDS
    wait_for("every replica to hold everything",
             lambda: all((describe(n)["high_watermark"] or 0) >= end for n in cluster.nodes), timeout=30)

    good = checksum(leader, TOPIC, end)
    assert isinstance(good, dict) and good["end_offset"] == end, good

    # A follower, down: one sealed segment deleted, a byte flipped in the first batch of
    # another (before its last index entry, where opening does not look).
    follower.kill()
    sealed = sealed_segments(follower)
    assert len(sealed) >= 6, sealed
    missing, flipped = sealed[3], sealed[1]
    missing.unlink()
    flip(flipped, 80)
    follower.start(timeout=FORM_TIMEOUT)

    # Opening met the missing segment, looked for damage everywhere and rebuilt both before
    # the replica opened.
    wait_for("the missing segment to be rebuilt", missing.exists, timeout=30)
    wait_for("the follower's copy to checksum as the leader's", lambda: checksum(follower, TOPIC, end) == good,
             timeout=30, interval=0.5)
    log = follower.log_path.read_text(errors="replace")
    assert "a segment is missing" in log and "CRC" in log, log[-3000:]
    assert log.count("rebuilt damaged offsets from another replica") == 2, log[-3000:]

    # The running follower: a byte flipped in another sealed segment. The first read that
    # meets it fails, naming the file, and starts the rebuild. (Once the restarted follower has
    # applied its log again: apply reads every entry back and would meet the damage first.)
    wait_for("the follower to apply everything again", lambda: (describe(follower)["high_watermark"] or 0) >= end,
             timeout=30, interval=0.2)
    flipped = sealed_segments(follower)[4]
    flip(flipped, 80)
    first = checksum(follower, TOPIC, end)
    assert isinstance(first, str) and flipped.name in first, first
    wait_for("the follower's copy to checksum as the leader's again", lambda: checksum(follower, TOPIC, end) == good,
             timeout=30, interval=0.5)
    log = follower.log_path.read_text(errors="replace")
    assert log.count("rebuilt damaged offsets from another replica") == 3, log[-3000:]

    # The running leader: a byte flipped in a sealed segment. Readers get an error for the
    # damaged offsets, never the damaged records, until the leader has rebuilt the segment.
    leader_id = wait_for("a leader", lambda: partition_state(admin, TOPIC), timeout=30)[0]
    leader = node_of(cluster, admin, leader_id)
    rebuilt_before = leader.log_path.read_text(errors="replace").count("rebuilt damaged offsets")
    flip(sealed_segments(leader)[2], 100)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.assign([TopicPartition(TOPIC, 0, 0)])
    values = []
    deadline = time.monotonic() + 60
    try:
        while len(values) < RECORDS and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            values.append(int(message.value().split(b":")[0]))
    finally:
        consumer.close()
    assert values == list(range(RECORDS)), (len(values), values[:5])
    log = leader.log_path.read_text(errors="replace")
    assert log.count("rebuilt damaged offsets") == rebuilt_before + 1, log[-3000:]
    assert all(checksum(node, TOPIC, end) == good for node in cluster.nodes)

    # A follower that fell behind catches up from the leader's log while a segment it needs is
    # damaged on the leader: the leader's Raft read meets the damage, rebuilds the segment from
    # the other follower and sends the entries (its group does not stop).
    leader_id, replicas, _ = wait_for("a leader", lambda: partition_state(admin, TOPIC), timeout=30)
    leader = node_of(cluster, admin, leader_id)
    behind = node_of(cluster, admin, next(r for r in replicas if r != leader_id))
    behind.kill()
    known = len(sealed_segments(leader))
    for i in range(RECORDS, 2 * RECORDS):
        producer.produce(TOPIC, b"%d:" % i + b"x" * 60, partition=0)
        producer.poll(0)
    assert producer.flush(30) == 0
    end = describe(leader)["high_watermark"]
    rebuilt_before = leader.log_path.read_text(errors="replace").count("rebuilt damaged offsets")
    flip(sealed_segments(leader)[known + 1], 100)
    behind.start(timeout=FORM_TIMEOUT)
    good = checksum(next(n for n in cluster.nodes if n not in (leader, behind)), TOPIC, end)
    assert isinstance(good, dict) and good["end_offset"] == end, good
    wait_for("the follower to catch up and checksum as the others",
             lambda: checksum(behind, TOPIC, end) == good, timeout=60, interval=0.5)
    # Rebuilt by the Raft read (nothing else read the leader's copy meanwhile), and the
    # partition kept its leader.
    log = leader.log_path.read_text(errors="replace")
    assert log.count("rebuilt damaged offsets") == rebuilt_before + 1, log[-3000:]
    assert partition_state(admin, TOPIC)[0] == leader_id
    assert checksum(leader, TOPIC, end) == good


def test_a_follower_far_behind_big_entries_catches_up(nodes_factory):
    """A follower stopped while 80 records of 900 KB are written (about 72 MB, more than one
    transport frame may carry) catches up: AppendEntries stop at 8 MiB, so openraft's batch of
    entries is cut short rather than refused, and the follower's copy checksums as the leader's."""
    from confluent_kafka import Producer

    cluster, bootstrap, admin = three_nodes(nodes_factory)
    _, leader, follower = rf3_topic(cluster, admin, "big")
    follower.kill()
    producer = Producer({"bootstrap.servers": leader.kafka, "acks": "all", "linger.ms": 0,
                         "message.max.bytes": 1_000_000})
    for i in range(80):
        producer.produce("big", bytes([i]) * 900_000, partition=0)
        producer.poll(0)
    assert producer.flush(120) == 0
    end = high_watermark(leader, "big")
    assert end >= 80
    follower.start(timeout=FORM_TIMEOUT)
    good = checksum(leader, "big", end)
    assert good["bytes"] > 72_000_000, good
    wait_for("the follower to catch up", lambda: checksum(follower, "big", end) == good, timeout=120, interval=0.5)


def test_a_replica_that_lost_trimmed_entries_copies_the_retained_log(nodes_factory):
    """A follower whose copy is lost after DeleteRecords trimmed every replica (its directory
    deleted while it was down) needs entries no replica has any more. openraft offers it the
    leader's snapshot; before installing it the follower copies the leader's retained log up to
    the snapshot's entry, then takes the entries after it as usual. The leader neither stops
    nor changes, writes go on meanwhile, and the follower's copy ends byte-identical to the
    leader's from the same log start offset."""
    import shutil

    from confluent_kafka import TopicPartition

    topic = "lost"
    cluster, bootstrap, admin = three_nodes(nodes_factory)
    leader_id, leader, follower = rf3_topic(cluster, admin, topic, {"segment.bytes": "16384"})
    produce = numbered_producer(bootstrap, topic, b"y")
    assert produce(0, 1000) == 0
    # Where nothing was being written: an entry ends there, on every replica.
    trim_at = high_watermark(leader, topic)
    assert produce(1000, 2000) == 0
    at = TopicPartition(topic, 0, trim_at)
    assert admin.delete_records([at])[at].result(30).low_watermark == trim_at
    wait_for(f"every copy to start at {trim_at}",
             lambda: all((n.data_dir / "logs" / f"{topic}-0" / "log-start-offset").exists()
                         and (n.data_dir / "logs" / f"{topic}-0" / "log-start-offset").read_text() == str(trim_at)
                         for n in cluster.nodes), timeout=20)
    follower.kill()
    shutil.rmtree(follower.data_dir / "logs" / f"{topic}-0")
    follower.start(timeout=FORM_TIMEOUT)
    assert produce(3000, 500) == 0
    assert partition_state(admin, topic)[0] == leader_id
    end = high_watermark(leader, topic)
    good = checksum(leader, topic, end)
    assert good["log_start_offset"] == trim_at and good["bytes"] > 2500 * 60, good
    wait_for("the emptied follower to hold the retained log", lambda: checksum(follower, topic, end) == good,
             timeout=60, interval=0.5)
    assert produce(3500, 500) == 0
    assert partition_state(admin, topic)[0] == leader_id
    end = high_watermark(leader, topic)
    wait_for("the follower to go on from the copy", lambda: checksum(follower, topic, end) == checksum(leader, topic, end),
             timeout=30, interval=0.5)
    log = follower.log_path.read_text(errors="replace")
    assert "copying another replica's retained log" in log, log[-3000:]
    assert "panicked" not in leader.log_path.read_text(errors="replace")


def test_retention_goes_on_without_a_follower_that_is_down(nodes_factory):
    """Size retention while a follower is down: once it is out of sync (silent for
    replica.lag.time.max.ms) it no longer holds trims back, as in Kafka, so the others delete
    what it never received. Restarted, it lacks entries no replica keeps, copies the retained
    log before installing the leader's snapshot, and ends byte-identical to the leader."""
    topic = "retained"
    env = {"SLUICE_KAFKA__REPLICA_LAG_TIME_MAX_MS": "1500", "SLUICE_STORAGE__HOUSEKEEPING_INTERVAL_MS": "1000"}
    cluster, bootstrap, admin = three_nodes(nodes_factory, env=env)
    leader_id, leader, follower = rf3_topic(cluster, admin, topic,
                                            {"segment.bytes": "16384", "retention.bytes": "65536"})
    produce = numbered_producer(bootstrap, topic, b"r")

    def log_start(node):
        path = node.data_dir / "logs" / f"{topic}-0" / "log-start-offset"
        return int(path.read_text()) if path.exists() else 0

    assert produce(0, 500) == 0
    follower.kill()
    held = high_watermark(leader, topic)
    # Many entries (the leader may keep its first attempt to send the stopped follower entries
    # in memory; the later ones it would have to read from its log).
    for first in range(500, 4500, 100):
        assert produce(first, 100) == 0
    wait_for("retention past what the stopped follower holds", lambda: log_start(leader) > held, timeout=30,
             interval=0.5)

    def first_segment(node):
        return min(int(p.name.split(".")[0]) for p in (node.data_dir / "logs" / f"{topic}-0").glob("*.log"))

    # The leader deletes the segments too (openraft purged the entries: no replication stream
    # reads them while the follower does not answer).
    wait_for("the trimmed segments deleted on the leader", lambda: first_segment(leader) > held, timeout=30,
             interval=0.5)
    follower.start(timeout=FORM_TIMEOUT)
    end = high_watermark(leader, topic)
    wait_for("the follower to hold the retained log",
             lambda: checksum(follower, topic, end) == checksum(leader, topic, end), timeout=60, interval=0.5)
    assert checksum(leader, topic, end)["log_start_offset"] > held
    assert partition_state(admin, topic)[0] == leader_id
    assert "copying another replica's retained log" in follower.log_path.read_text(errors="replace")


def test_a_replica_whose_copy_was_lost_is_sent_the_log_again(nodes_factory):
    """A follower's copy of an untrimmed partition is deleted while it is down (a replaced
    disk): restarted empty, it is sent the whole log by the leader — which neither stops nor
    changes — and ends byte-identical to the others."""
    import shutil

    from confluent_kafka import Producer

    topic = "refilled"
    cluster, bootstrap, admin = three_nodes(nodes_factory)
    leader_id, leader, follower = rf3_topic(cluster, admin, topic, {"segment.bytes": "65536"})
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                         "enable.idempotence": True})
    for i in range(5000):
        producer.produce(topic, b"%d:" % i + b"z" * 60, partition=0)
        producer.poll(0)
    assert producer.flush(30) == 0
    follower.kill()
    shutil.rmtree(follower.data_dir / "logs" / f"{topic}-0")
    follower.start(timeout=FORM_TIMEOUT)
    end = high_watermark(leader, topic)
    good = checksum(leader, topic, end)
    assert good["bytes"] > 5000 * 60, good
    wait_for("the emptied follower to hold the log again", lambda: checksum(follower, topic, end) == good,
             timeout=60, interval=0.5)
    assert partition_state(admin, topic)[0] == leader_id
    assert "panicked" not in leader.log_path.read_text(errors="replace")
