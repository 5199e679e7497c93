"""Reassigning replicated partitions (Kafka's AlterPartitionReassignments) on four real
`sluice` processes: a reassignment is a Raft membership change of the partition's group.

A partition of three replicas is moved, under an idempotent acks=all producer, to the fourth
node and away from its leader: the new replica joins as a learner, catches up from the log and
becomes a voter (joint consensus), the old leader leaves and hands over, and every acknowledged
record is read back exactly once at its offset; the new replica's copy checksums the same as
the others', the removed node's files are gone, and ListPartitionReassignments shows the move
while it runs and nothing after. A move to a node that is down waits (its learner cannot catch
up) and is cancelled: the partition stays where it was. A partition whose log was trimmed moves
as well: the new replica copies the retained log before it joins.
"""

import json
import threading
import time

from test_cluster import FORM_TIMEOUT, live_brokers, nodes_factory, settled, wait_for  # noqa: F401
from test_replicated_partitions import node_of, read_back

TOPIC = "moving"


def metadata_of(admin, topic):
    """(leader, replicas in order, isr) of partition 0 as the Kafka metadata says, or None."""
    from confluent_kafka import KafkaException

    try:
        described = admin.list_topics(topic, timeout=5).topics.get(topic)
    except KafkaException:
        return None
    if described is None or described.error is not None or 0 not in described.partitions:
        return None
    partition = described.partitions[0]
    if partition.leader < 0:
        return None
    return partition.leader, list(partition.replicas), sorted(partition.isrs)


def four_nodes_and_a_topic(nodes_factory):
    """Four nodes in one cluster, a topic of one partition with three replicas, and who is
    who: (cluster, bootstrap list, admin client, leader id, replica ids, the fourth node's id)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    cluster = nodes_factory(4).start()
    wait_for("a four-voter cluster", lambda: settled(cluster.nodes, 4))
    wait_for("four live brokers", lambda: all(live_brokers(n) == 4 for n in cluster.nodes), timeout=20)
    bootstrap = ",".join(node.kafka for node in cluster.nodes)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=3)])[TOPIC].result(30)
    leader_id, replicas, _ = wait_for("a leader", lambda: metadata_of(admin, TOPIC), timeout=30)
    outsider = next(i for i in sorted(admin.list_topics(timeout=10).brokers) if i not in replicas)
    return cluster, bootstrap, admin, leader_id, replicas, outsider


def checksums(holders, end):
    """Each holder's checksum of partition 0 up to `end`, once every holder reaches it."""
    from conftest import run_cli as cli

    def summed(node, check=True):
        answer = cli(node, "topic", "checksum", TOPIC, "--partition", "0", "--to", str(end),
                     "--output", "json", check=check)
        return json.loads(answer.stdout or "{}")

    wait_for(f"every replica to reach offset {end}",
             lambda: all(summed(n, check=False).get("end_offset") == end for n in holders),
             timeout=30, interval=0.5)
    return [summed(n) for n in holders]


def retried(call, *args):
    """`call(*args)` of a kafka-python admin client, tried again while the node it takes for
    the controller cannot be reached (the nodes' views of a killed controller converge within
    a second or two)."""
    from kafka.errors import KafkaConnectionError

    deadline = time.monotonic() + 30
    while True:
        try:
            return call(*args)
        except KafkaConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_partition_moves_to_another_node_and_off_its_leader_losing_nothing(nodes_factory):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient
    from kafka import KafkaAdminClient, TopicPartition

    from conftest import run_cli as cli

    cluster, bootstrap, admin, leader_id, replicas, outsider = four_nodes_and_a_topic(nodes_factory)
    # The outsider in, the leader out; the outsider is to lead.
    target = [outsider] + [r for r in replicas if r != leader_id]
    old_leader = node_of(cluster, admin, leader_id)
    kafka_admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    tp = TopicPartition(TOPIC, 0)

    acked = {}  # value -> offset
    failures = []
    fatal = []
    stop = threading.Event()

    def produce():
        def delivered(error, message):
            if error is not None:
                if error.fatal():
                    fatal.append(str(error))
                failures.append(str(error))
            else:
                acked[int(message.value())] = message.offset()

        producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                             "max.in.flight.requests.per.connection": 5, "linger.ms": 2,
                             "message.timeout.ms": 60000})
        value = 0
        while not stop.is_set():
            producer.produce(TOPIC, str(value).encode(), partition=0, on_delivery=delivered)
            value += 1
            producer.poll(0)
            time.sleep(0.002)
        assert producer.flush(90) == 0

    writer = threading.Thread(target=produce)
    writer.start()
    try:
        wait_for("records acknowledged before the move", lambda: len(acked) >= 500, timeout=30)
        assert kafka_admin.alter_partition_reassignments({tp: target}) == {tp: None}
        # Listed while it runs (the learner catches up, the voters change) — or already done.
        listed = kafka_admin.list_partition_reassignments()
        if tp in listed:
            assert listed[tp]["adding_replicas"] == [outsider], listed
            assert listed[tp]["removing_replicas"] == [leader_id], listed
            assert sorted(listed[tp]["replicas"]) == sorted(replicas + [outsider]), listed

        def moved():
            state = metadata_of(admin, TOPIC)
            return (state if state is not None and state[1] == target and tp not in kafka_admin.list_partition_reassignments()
                    else None)

        new_leader, _, _ = wait_for("the move to be done", moved, timeout=60, interval=0.2)
        assert new_leader != leader_id
        wait_for("records acknowledged after the move", lambda: len(acked) >= 1500, timeout=60)
    finally:
        stop.set()
        writer.join(120)
    assert fatal == [], fatal
    assert not writer.is_alive()

    # Everything acknowledged, exactly once, at its offset, in order.
    read = read_back(bootstrap, TOPIC, len(acked))
    offsets = {}
    for value, offset in read:
        assert value not in offsets, f"{value} read twice"
        offsets[value] = offset
    missing = [v for v, o in acked.items() if offsets.get(v) != o]
    assert missing == [], f"{len(missing)} acknowledged records not at their offsets: {missing[:10]}"
    values = [value for value, _ in read]
    assert values == sorted(values)

    # The new replica holds the same bytes as the others; the removed node none.
    end = max(acked.values()) + 1
    sums = checksums([node_of(cluster, admin, i) for i in target], end)
    assert len({(s["bytes"], s["crc32c"]) for s in sums}) == 1, sums
    wait_for("the old leader's copy removed", lambda: not (old_leader.data_dir / "logs" / f"{TOPIC}-0").exists(),
             timeout=20)
    # The preferred replica (the target's first) takes the lead.
    wait_for("the outsider to lead", lambda: (s := metadata_of(admin, TOPIC)) and s[0] == outsider, timeout=30,
             interval=0.2)
    assert sorted(metadata_of(admin, TOPIC)[2]) == sorted(target)

    # A move to a node that is down waits for it; cancelling it leaves the partition as it was.
    absent = node_of(cluster, admin, leader_id)  # not a replica any more
    absent.kill()
    # kafka-python sends reassignments to the controller, which may have been on that node.
    survivors = ",".join(node.kafka for node in cluster.nodes if node is not absent)
    wait_for("a controller on another node",
             lambda: AdminClient({"bootstrap.servers": survivors}).list_topics(timeout=5).controller_id
             not in (-1, leader_id), timeout=30, interval=0.2)
    kafka_admin.close()
    kafka_admin = KafkaAdminClient(bootstrap_servers=survivors, request_timeout_ms=30000)
    assert retried(kafka_admin.alter_partition_reassignments, {tp: target + [leader_id]}) == {tp: None}
    time.sleep(2)
    listed = kafka_admin.list_partition_reassignments()
    assert listed[tp]["adding_replicas"] == [leader_id], listed
    assert kafka_admin.alter_partition_reassignments({tp: None}) == {tp: None}
    wait_for("the cancelled move gone", lambda: tp not in kafka_admin.list_partition_reassignments(), timeout=30)
    # Nothing in progress: a second cancel is refused as Kafka refuses it.
    result = kafka_admin.alter_partition_reassignments({tp: None})
    assert result[tp] is not None and result[tp].__name__ == "NoReassignmentInProgressError", result
    absent.launch()
    absent.wait_ready(FORM_TIMEOUT)
    wait_for("the cancelled move done", lambda: (s := metadata_of(admin, TOPIC)) and s[1] == target, timeout=30)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    producer.produce(TOPIC, str(10**9).encode(), partition=0)
    assert producer.flush(30) == 0
    time.sleep(1)
    assert not (absent.data_dir / "logs" / f"{TOPIC}-0").exists()

    # A trimmed log moves too: the new replica, offered the leader's snapshot, first copies the
    # leader's retained log up to the snapshot's entry, then joins; every copy ends
    # byte-identical from the same log start offset.
    from confluent_kafka import TopicPartition as Offset

    def high_watermark():
        holder = node_of(cluster, admin, metadata_of(admin, TOPIC)[0])
        described = json.loads(cli(holder, "topic", "describe", TOPIC, "--output", "json").stdout)
        return described["partitions"][0]["high_watermark"]

    trim_at = high_watermark()  # nothing is being written: an entry ends there
    for i in range(2000):
        producer.produce(TOPIC, str(2 * 10**9 + i).encode(), partition=0)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert admin.delete_records([Offset(TOPIC, 0, trim_at)])[Offset(TOPIC, 0, trim_at)].result(30).low_watermark == trim_at
    leader = node_of(cluster, admin, metadata_of(admin, TOPIC)[0])
    wait_for("the trim applied on the leader",
             lambda: (leader.data_dir / "logs" / f"{TOPIC}-0" / "raft-purged").exists(), timeout=30, interval=0.2)
    assert kafka_admin.alter_partition_reassignments({tp: target + [leader_id]}) == {tp: None}
    wait_for("the trimmed partition moved", lambda: (s := metadata_of(admin, TOPIC)) and s[1] == target + [leader_id]
             and tp not in kafka_admin.list_partition_reassignments(), timeout=60, interval=0.2)
    end = high_watermark()
    sums = checksums([node_of(cluster, admin, i) for i in target + [leader_id]], end)
    assert len({(s["log_start_offset"], s["bytes"], s["crc32c"]) for s in sums}) == 1, sums
    assert sums[0]["log_start_offset"] == trim_at and sums[0]["bytes"] > 2000 * 10, sums
    assert "copying another replica's retained log" in absent.log_path.read_text(errors="replace")
    kafka_admin.close()


def test_a_move_goes_on_when_the_leader_is_killed_during_it(nodes_factory):
    """The leader is SIGKILLed right after the reassignment is committed (its learner being
    added or catching up): the next leader carries the move on from the group's membership,
    and the killed node, restarted, ends with the data it is to hold — or none."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient
    from kafka import KafkaAdminClient, TopicPartition

    from conftest import run_cli as cli

    cluster, bootstrap, admin, leader_id, replicas, outsider = four_nodes_and_a_topic(nodes_factory)
    follower = next(r for r in replicas if r != leader_id)
    # The outsider replaces a follower; the leader stays a replica but is killed.
    target = [r if r != follower else outsider for r in replicas]
    leader = node_of(cluster, admin, leader_id)

    acked = {}
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 5, "message.timeout.ms": 60000})

    def delivered(error, message):
        assert error is None or not error.fatal(), error
        if error is None:
            acked[int(message.value())] = message.offset()

    for value in range(20_000):
        producer.produce(TOPIC, str(value).encode(), partition=0, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(60) == 0

    others = ",".join(node.kafka for node in cluster.nodes if node is not leader)
    kafka_admin = KafkaAdminClient(bootstrap_servers=others, request_timeout_ms=30000)
    controller = wait_for("a controller", lambda: admin.list_topics(timeout=5).controller_id, timeout=10)
    if controller == leader_id:  # kafka-python asks the controller; keep it alive for the request
        kafka_admin.close()
        kafka_admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    tp = TopicPartition(TOPIC, 0)
    assert kafka_admin.alter_partition_reassignments({tp: target}) == {tp: None}
    leader.kill()
    kafka_admin.close()

    survivors = AdminClient({"bootstrap.servers": others})
    for value in range(20_000, 20_100):
        producer.produce(TOPIC, str(value).encode(), partition=0, on_delivery=delivered)
    assert producer.flush(60) == 0
    leader.launch()
    leader.wait_ready(FORM_TIMEOUT)

    def moved():
        state = metadata_of(survivors, TOPIC)
        return state is not None and state[1] == target

    wait_for("the move to be done", moved, timeout=60, interval=0.2)
    assert len(acked) == 20_100
    read = read_back(bootstrap, TOPIC, len(acked))
    assert sorted(value for value, _ in read) == list(range(20_100))
    assert all(acked[value] == offset for value, offset in read)
    end = max(acked.values()) + 1
    holders = [node_of(cluster, admin, i) for i in target]

    def sums():
        out = []
        for node in holders:
            answer = cli(node, "topic", "checksum", TOPIC, "--partition", "0", "--to", str(end), "--output", "json",
                         check=False)
            if answer.returncode != 0:
                return None
            out.append(json.loads(answer.stdout))
        return out

    summed = wait_for("every replica to checksum to the end", sums, timeout=30, interval=0.5)
    assert len({(s["end_offset"], s["bytes"], s["crc32c"]) for s in summed}) == 1, summed
    removed = node_of(cluster, admin, follower)
    wait_for("the removed follower's copy gone", lambda: not (removed.data_dir / "logs" / f"{TOPIC}-0").exists(),
             timeout=20)
