"""Consumer groups in a cluster: a group's coordinator is the leader of its partition of the
replicated `__consumer_offsets` topic, so committed offsets survive the coordinator's death.

A confluent-kafka consumer group commits synchronously while the group's coordinator is
SIGKILLed twice and restarted: the group finds the new coordinator (another replica of its
partition), members rejoin, every record is consumed, and the committed offsets — watched all
along by an admin client — never go backwards; afterwards every node's copy of the table holds
the same offsets.
"""

import json
import threading
import time

from test_cluster import FORM_TIMEOUT, cli, nodes_factory, wait_for  # noqa: F401
from test_replicated_partitions import node_of, three_nodes

TOPIC = "work"
GROUP = "workers"
PARTITIONS = 3
KILLS = 2
ROUND = 3000


def committed(bootstrap, group=GROUP):
    """{partition: committed offset} as the group's coordinator answers, or None while it
    cannot answer. (kafka-python's admin client: librdkafka's aborts on an assertion when a
    coordinator lookup answers after its request timed out.)"""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    except KafkaError:
        return None
    try:
        found = admin.list_group_offsets(group)[group]
        return {tp.partition: meta.offset for tp, meta in found.items() if meta.offset >= 0}
    except KafkaError:
        return None
    finally:
        admin.close()


def java_hash(text):
    """Java's String.hashCode."""
    h = 0
    for unit in text.encode("utf-16-be").hex(" ", 2).split():
        h = (31 * h + int(unit, 16)) & 0xFFFFFFFF
    return h - (1 << 32) if h & 0x80000000 else h


def coordinator(admin, group=GROUP):
    """The broker id of the group's coordinator: the leader of its partition of
    `__consumer_offsets` (Kafka's abs(hashCode) of the id modulo the partitions), or None."""
    from confluent_kafka import KafkaException

    try:
        topic = admin.list_topics("__consumer_offsets", timeout=5).topics.get("__consumer_offsets")
    except KafkaException:
        return None
    if topic is None or topic.error is not None or not topic.partitions:
        return None
    partition = topic.partitions.get(abs(java_hash(group)) % len(topic.partitions))
    return partition.leader if partition is not None and partition.leader >= 0 else None


def test_committed_offsets_survive_coordinator_kills_and_never_go_backwards(nodes_factory):
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import NewTopic

    cluster, bootstrap, admin = three_nodes(nodes_factory)
    admin.create_topics([NewTopic(TOPIC, num_partitions=PARTITIONS, replication_factor=3)])[TOPIC].result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 5})
    produced = [0]

    def produce(count):
        for _ in range(count):
            value = produced[0]
            producer.produce(TOPIC, key=f"k{value % 97}", value=str(value).encode())
            produced[0] += 1
            if value % 1000 == 0:
                producer.poll(0)
        assert producer.flush(60) == 0

    seen = set()
    ends = {}  # partition -> the offset after the last record consumed
    last_commit = {}  # partition -> the highest offset a synchronous commit acknowledged
    failures = []
    stop = threading.Event()

    def consume():
        from confluent_kafka import KafkaException

        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": GROUP,
                             "auto.offset.reset": "earliest", "enable.auto.commit": False,
                             "session.timeout.ms": 10000, "heartbeat.interval.ms": 500,
                             "topic.metadata.refresh.interval.ms": 1000})
        consumer.subscribe([TOPIC])
        since_commit = 0
        try:
            while not stop.is_set():
                message = consumer.poll(0.2)
                if message is not None and not message.error():
                    seen.add(int(message.value()))
                    ends[message.partition()] = max(ends.get(message.partition(), 0), message.offset() + 1)
                    since_commit += 1
                if since_commit >= 100 or (message is None and since_commit):
                    try:
                        for tp in consumer.commit(asynchronous=False) or []:
                            if tp.error is None and tp.offset >= 0:
                                last_commit[tp.partition] = max(last_commit.get(tp.partition, 0), tp.offset)
                        since_commit = 0
                    except KafkaException:
                        pass  # the coordinator moved: committed again after the rejoin
        except Exception as error:  # reported by the test thread
            failures.append(repr(error))
        finally:
            consumer.close()

    watched = []  # (time, {partition: offset}) as the admin client saw them
    went_back = []

    def watch():
        highest = {}
        while not stop.is_set():
            offsets = committed(bootstrap)
            if offsets is not None:
                watched.append(offsets)
                for partition, offset in offsets.items():
                    if offset < highest.get(partition, -1):
                        went_back.append((partition, highest[partition], offset))
                    highest[partition] = max(highest.get(partition, -1), offset)
            time.sleep(0.2)

    progress = {}

    def caught_up():
        """Every record produced so far consumed and committed."""
        offsets = committed(bootstrap)
        progress.update(seen=len(seen), produced=produced[0], committed=offsets, ends=dict(ends),
                        acknowledged=dict(last_commit))
        # A commit may be past the last record consumed: the consumer's position skips the
        # control batch of a leader change (a new term's first entry) right after it.
        return (len(seen) == produced[0] and offsets is not None and set(offsets) == set(ends)
                and all(offsets[p] >= end for p, end in ends.items()))

    threads = [threading.Thread(target=consume), threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    try:
        produce(ROUND)
        wait_for("the first records consumed and committed", caught_up, timeout=90)
        for round in range(KILLS):
            before = dict(last_commit)
            coordinator_id = wait_for("the group's coordinator", lambda: coordinator(admin), timeout=30)
            victim = node_of(cluster, admin, coordinator_id)
            victim.kill()
            # Another replica of the group's partition coordinates it, with every offset the
            # old coordinator acknowledged.
            others = ",".join(n.kafka for n in cluster.nodes if n is not victim)
            from confluent_kafka.admin import AdminClient

            survivors = AdminClient({"bootstrap.servers": others})
            new_id = wait_for(f"a new coordinator after kill {round + 1}",
                              lambda: (c := coordinator(survivors)) is not None and c != coordinator_id and c,
                              timeout=30)
            assert new_id != coordinator_id
            after = wait_for("the new coordinator's offsets", lambda: committed(others), timeout=30)
            behind = {p: (o, after.get(p, -1)) for p, o in before.items() if after.get(p, -1) < o}
            assert not behind, f"committed offsets went back after kill {round + 1}: {behind}"
            produce(ROUND)
            wait_for(f"records consumed and committed after kill {round + 1}", caught_up, timeout=90)
            victim.launch()
            victim.wait_ready(FORM_TIMEOUT)
        produce(ROUND)
        wait_for("the last records consumed and committed", caught_up, timeout=90)
    except AssertionError as error:
        raise AssertionError(f"{error}; progress: {progress}; failures: {failures[:3]}") from None
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not failures, failures[:5]
    assert seen == set(range(produced[0])), produced[0] - len(seen)
    assert not went_back, went_back[:5]
    assert len(watched) > 10, "the watcher saw too few answers"

    # Every replica's table holds the same offsets: each node's admin API reads its own copy.
    def tables_agree():
        views = []
        for node in cluster.nodes:
            result = cli(node, "group", "describe", GROUP, "--output", "json", check=False)
            if result.returncode != 0:
                return None
            offsets = json.loads(result.stdout).get("offsets") or []
            views.append(sorted((o["topic"], o["partition"], o["committed"]) for o in offsets))
        return views if all(v == views[0] for v in views) and len(views[0]) == PARTITIONS else None

    views = wait_for("every node's copy of the offsets to agree", tables_agree, timeout=30)
    assert {partition: offset for _, partition, offset in views[0]} == ends, views[0]
