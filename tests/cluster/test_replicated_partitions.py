"""Replicated partitions on three real `sluice` processes (127.0.0.2-4): a topic created with
replication factor 3 is a Raft group per partition whose log is the partition's log.

An idempotent acks=all producer (librdkafka, five requests in flight) writes while the
partition's leader is SIGKILLed and restarted three times, or frozen (SIGSTOP) past the
election timeout and thawed: every acknowledged record is read back exactly once at the offset
it was acknowledged with, in the order it was produced, and the producer never raises a fatal
error.
"""

import json
import threading
import time

from test_cluster import FORM_TIMEOUT, live_brokers, nodes_factory, settled, wait_for  # noqa: F401

TOPIC = "replicated"
KILLS = 3


def partition_state(admin, topic=TOPIC):
    """(leader id, replica ids, isr ids) of partition 0, or None while it has no leader (or no
    broker answered: one may be down)."""
    from confluent_kafka import KafkaException

    try:
        metadata = admin.list_topics(topic, timeout=5)
    except KafkaException:
        return None
    described = metadata.topics.get(topic)
    if described is None or described.error is not None or 0 not in described.partitions:
        return None
    partition = described.partitions[0]
    if partition.leader < 0:
        return None
    return partition.leader, sorted(partition.replicas), sorted(partition.isrs)


def preferred_leads(admin, topic):
    """Whether partition 0 of `topic` is led by its preferred replica (the first listed)."""
    from confluent_kafka import KafkaException

    try:
        described = admin.list_topics(topic, timeout=5).topics.get(topic)
    except KafkaException:
        return False
    partition = described.partitions.get(0) if described is not None and described.error is None else None
    return partition is not None and bool(partition.replicas) and partition.leader == partition.replicas[0]


def node_of(cluster, admin, broker_id):
    """The test's node whose Kafka listener is broker `broker_id`."""
    from confluent_kafka import KafkaException

    def find():
        try:
            brokers = admin.list_topics(timeout=5).brokers
        except KafkaException:
            return None
        if broker_id not in brokers:
            return None
        address = f"{brokers[broker_id].host}:{brokers[broker_id].port}"
        return next(node for node in cluster.nodes if node.kafka == address)

    return wait_for(f"broker {broker_id} in the metadata", find, timeout=30)


def three_nodes(nodes_factory, env=None):
    """Three nodes that form a cluster and count each other live (so any of them takes a
    CreateTopics), their Kafka bootstrap list and an admin client on it."""
    from confluent_kafka.admin import AdminClient

    cluster = nodes_factory(3, env=env).start()
    wait_for("a three-voter cluster", lambda: settled(cluster.nodes, 3))
    wait_for("three live brokers", lambda: all(live_brokers(n) == 3 for n in cluster.nodes), timeout=20)
    bootstrap = ",".join(node.kafka for node in cluster.nodes)
    return cluster, bootstrap, AdminClient({"bootstrap.servers": bootstrap})


def read_back(bootstrap, topic, expected):
    """(value, offset) of every record of partition 0, read from the start by a fresh consumer
    until `expected` records arrived or a minute passed."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"checker-{topic}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    read = []
    deadline = time.monotonic() + 60
    try:
        while len(read) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                assert message.error().code() == KafkaError._PARTITION_EOF, message.error()
                continue
            read.append((int(message.value()), message.offset()))
    finally:
        consumer.close()
    return read


def test_acknowledged_records_survive_leader_kills_exactly_once_and_in_order(nodes_factory):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    cluster, bootstrap, admin = three_nodes(nodes_factory)
    a = cluster.nodes[0]
    # One cluster to clients: every node reports the same cluster id.
    ids = {AdminClient({"bootstrap.servers": node.kafka}).list_topics(timeout=10).cluster_id
           for node in cluster.nodes}
    assert len(ids) == 1, ids
    admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=3)])[TOPIC].result(30)
    state = wait_for("a leader with three replicas", lambda: partition_state(admin), timeout=30)
    assert len(state[1]) == 3, state

    acked = {}  # value -> offset
    failures = []
    fatal = []
    stop = threading.Event()

    def delivered(error, message):
        if error is not None:
            failures.append(str(error))
        else:
            acked[int(message.value())] = message.offset()

    def errored(error):
        if error.fatal():
            fatal.append(str(error))

    producer = Producer({
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "max.in.flight.requests.per.connection": 5,
        "linger.ms": 2,
        "message.timeout.ms": 60000,
        "topic.metadata.refresh.interval.ms": 1000,
        "error_cb": errored,
    })
    sent = [0]

    def produce():
        while not stop.is_set():
            try:
                producer.produce(TOPIC, value=str(sent[0]).encode(), partition=0, on_delivery=delivered)
                sent[0] += 1
            except BufferError:
                pass
            producer.poll(0.001 if sent[0] % 50 else 0.01)

    writer = threading.Thread(target=produce)
    writer.start()
    try:
        for round in range(KILLS):
            time.sleep(2)
            leader_id = wait_for("a leader", lambda: partition_state(admin), timeout=30)[0]
            leader = node_of(cluster, admin, leader_id)
            before = len(acked)
            leader.kill()
            # Another replica takes over and acknowledges writes again.
            wait_for(f"a new leader after kill {round + 1}",
                     lambda: (s := partition_state(admin)) and s[0] != leader_id, timeout=30)
            wait_for(f"writes acknowledged after kill {round + 1}", lambda: len(acked) > before + 100,
                     timeout=30)
            leader.launch()
            leader.wait_ready(FORM_TIMEOUT)
        time.sleep(2)
    finally:
        stop.set()
        writer.join(timeout=30)
    remaining = producer.flush(60)
    assert remaining == 0, f"{remaining} records never acknowledged"
    assert not fatal, fatal
    assert not failures, failures[:5]
    assert len(acked) == sent[0] and len(acked) > 1000, (len(acked), sent[0])

    # Read everything back from the current leader: each acknowledged value exactly once, at
    # its acknowledged offset, in the order produced.
    read = read_back(bootstrap, TOPIC, len(acked))
    values = [value for value, _ in read]
    assert len(values) == len(set(values)), "a record was read twice"
    assert sorted(values) == values, "records out of the order they were produced"
    offsets = dict(read)
    assert set(offsets) == set(acked), (len(offsets), len(acked))
    wrong = [(v, acked[v], offsets[v]) for v in acked if offsets[v] != acked[v]]
    assert not wrong, wrong[:5]


def test_a_frozen_leader_commits_nothing_and_nothing_acknowledged_is_lost(nodes_factory):
    """SIGSTOP the partition's leader past the election timeout while an idempotent producer
    keeps writing, then SIGCONT: another replica leads meanwhile, the old leader commits nothing
    in its old term (its stale appends are truncated), and every acknowledged record is read
    back exactly once at its acknowledged offset."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    cluster, bootstrap, admin = three_nodes(nodes_factory)
    admin.create_topics([NewTopic("frozen", num_partitions=1, replication_factor=3)])["frozen"].result(30)
    old_leader_id = wait_for("a leader", lambda: partition_state(admin, "frozen"), timeout=30)[0]
    old_leader = node_of(cluster, admin, old_leader_id)

    acked, failures, fatal = {}, [], []
    producer = Producer({
        "bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
        "max.in.flight.requests.per.connection": 5, "linger.ms": 2, "message.timeout.ms": 60000,
        # A frozen broker keeps its sockets open: without shorter timeouts the client waits a
        # minute for it before it asks for metadata elsewhere (as it would with Kafka).
        "request.timeout.ms": 5000, "socket.timeout.ms": 5000,
        "topic.metadata.refresh.interval.ms": 1000,
        "error_cb": lambda e: fatal.append(str(e)) if e.fatal() else None,
    })

    def delivered(error, message):
        if error is not None:
            failures.append(str(error))
        else:
            acked[int(message.value())] = message.offset()

    def send(start, count):
        for value in range(start, start + count):
            while True:
                try:
                    producer.produce("frozen", value=str(value).encode(), partition=0, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.01)
            producer.poll(0)

    send(0, 2000)
    assert producer.flush(30) == 0
    old_leader.freeze()
    try:
        # Other admin clients ask the two live nodes.
        others = ",".join(n.kafka for n in cluster.nodes if n is not old_leader)
        live_admin = AdminClient({"bootstrap.servers": others})
        wait_for("another leader while the old one is frozen",
                 lambda: (s := partition_state(live_admin, "frozen")) and s[0] != old_leader_id, timeout=30)
        send(2000, 2000)
        # Delivery reports arrive through poll().
        wait_for("writes acknowledged by the new leader",
                 lambda: producer.poll(0.1) >= 0 and len(acked) >= 4000, timeout=60)
    finally:
        old_leader.thaw()
    send(4000, 2000)
    assert producer.flush(60) == 0
    assert not fatal, fatal
    assert not failures, failures[:5]
    assert len(acked) == 6000
    read = read_back(bootstrap, "frozen", len(acked))
    values = [value for value, _ in read]
    assert len(values) == len(set(values)), "a record was read twice"
    assert sorted(values) == values, "records out of the order they were produced"
    assert dict(read) == acked


def test_topics_default_to_three_replicas_and_min_insync_replicas_refuses_unwritten(nodes_factory):
    """A topic created without a factor on three nodes has three replicas. With
    min.insync.replicas 3 and a follower killed, an acks=all produce is refused with
    NOT_ENOUGH_REPLICAS and nothing is written, while acks=1 is answered; lowering the topic's
    min.insync.replicas to 2 lets acks=all through again."""
    from confluent_kafka import KafkaError, Producer
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

    cluster, bootstrap, admin = three_nodes(nodes_factory, env={"SLUICE_KAFKA__REPLICA_LAG_TIME_MAX_MS": "1500"})
    admin.create_topics([NewTopic("defaulted", num_partitions=2)])["defaulted"].result(30)
    assert len(wait_for("a leader", lambda: partition_state(admin, "defaulted"), timeout=30)[1]) == 3
    admin.create_topics([NewTopic("strict", num_partitions=1, replication_factor=3,
                                  config={"min.insync.replicas": "3"})])["strict"].result(30)
    # Offsets are compared below: wait until leadership has settled on the preferred replica.
    wait_for("the preferred replica to lead", lambda: preferred_leads(admin, "strict"), timeout=30)
    leader_id, replicas, _ = wait_for("a leader", lambda: partition_state(admin, "strict"), timeout=30)
    assert len(replicas) == 3

    def produce(acks, value):
        """The delivery error code of one record (None when acknowledged) and its offset."""
        producer = Producer({"bootstrap.servers": bootstrap, "acks": acks, "retries": 0,
                             "enable.idempotence": False, "message.timeout.ms": 20000})
        outcome = []
        producer.produce("strict", value=value, partition=0,
                         on_delivery=lambda e, m: outcome.append((e.code() if e else None, m.offset())))
        producer.flush(30)
        assert outcome, "no delivery report"
        return outcome[0]

    code, first = produce("all", b"all three")
    assert code is None, code
    follower_id = next(r for r in replicas if r != leader_id)
    follower = node_of(cluster, admin, follower_id)
    follower.kill()
    time.sleep(2.5)  # past replica.lag.time.max.ms: the follower is out of sync
    code, _ = produce("all", b"refused")
    assert code == KafkaError.NOT_ENOUGH_REPLICAS, code
    isr = wait_for("the killed follower out of the ISR",
                   lambda: (s := partition_state(admin, "strict")) and len(s[2]) == 2 and s[2], timeout=20)
    assert follower_id not in isr
    code, offset = produce("1", b"leader only")
    # The refused record took no offset (Raft's own entries take offsets too, but no leader
    # changed here).
    assert code is None and offset == first + 1, (code, first, offset)

    # Asked of the live nodes (a client bootstrapped from the killed one may pick it).
    live = AdminClient({"bootstrap.servers": ",".join(n.kafka for n in cluster.nodes if n is not follower)})
    resource = ConfigResource("topic", "strict", incremental_configs=[
        ConfigEntry("min.insync.replicas", "2", incremental_operation=AlterConfigOpType.SET)])
    live.incremental_alter_configs([resource])[resource].result(30)
    code = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the new setting reaches the leader through the controller
        code, offset = produce("all", b"two of three")
        if code is None:
            break
        assert code == KafkaError.NOT_ENOUGH_REPLICAS, code
        time.sleep(0.2)
    assert code is None and offset == first + 2, (code, first, offset)


def test_a_follower_stopped_through_10000_batches_catches_up_byte_identical(nodes_factory):
    """A follower is killed while 10,000 batches are written, then restarted: it catches up
    from the leader's log, and its copy checksums the same as the leader's and the other
    follower's (`sluice topic checksum` on each node); the leader's describe shows it in sync
    with no lag."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import NewTopic

    from conftest import run_cli as cli

    cluster, bootstrap, admin = three_nodes(nodes_factory)
    admin.create_topics([NewTopic("catchup", num_partitions=1, replication_factor=3)])["catchup"].result(30)
    leader_id, replicas, _ = wait_for("a leader", lambda: partition_state(admin, "catchup"), timeout=30)
    leader = node_of(cluster, admin, leader_id)
    follower = node_of(cluster, admin, next(r for r in replicas if r != leader_id))
    follower.kill()

    # One record per batch: 10,000 batches.
    producer = Producer({"bootstrap.servers": leader.kafka, "acks": "all", "linger.ms": 0,
                         "batch.num.messages": 1, "enable.idempotence": True})
    for i in range(10_000):
        while True:
            try:
                producer.produce("catchup", value=b"%d" % i, partition=0)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    assert producer.flush(120) == 0

    def detail(node):
        return json.loads(cli(node, "topic", "describe", "catchup", "--output", "json").stdout)["partitions"][0]

    end = detail(leader)["high_watermark"]
    assert end >= 10_000
    follower.start(timeout=FORM_TIMEOUT)
    wait_for("the follower to catch up", lambda: (detail(follower)["high_watermark"] or 0) >= end, timeout=120)

    def checksum(node):
        return json.loads(cli(node, "topic", "checksum", "catchup", "--partition", "0", "--to", str(end),
                              "--output", "json").stdout)

    sums = [checksum(node) for node in cluster.nodes]
    assert all(s["end_offset"] == end for s in sums), sums
    assert len({(s["bytes"], s["crc32c"]) for s in sums}) == 1, sums
    assert sums[0]["bytes"] > 10_000 * 60  # every batch, not an empty range

    def caught_up():
        current = node_of(cluster, admin, wait_for("a leader", lambda: partition_state(admin, "catchup"))[0])
        followers = detail(current)["followers"] or []
        return len(followers) == 2 and all(f["in_sync"] and f["lag"] == 0 for f in followers)

    wait_for("both followers in sync with no lag", caught_up, timeout=30)


def test_preferred_leader_election_and_log_dirs(nodes_factory):
    """With automatic leader rebalancing off, a partition whose preferred leader was killed and
    restarted stays with the replica that took over until a preferred leader election
    (ElectLeaders, sent to the controller whichever node leads) moves it back; a second election
    is not needed. DescribeLogDirs lists every node's log directory with its replicas."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import ElectionNotNeededError, PreferredLeaderNotAvailableError

    cluster, bootstrap, admin = three_nodes(
        nodes_factory, env={"SLUICE_KAFKA__AUTO_LEADER_REBALANCE_ENABLE": "false"})
    from confluent_kafka.admin import NewTopic

    admin.create_topics([NewTopic("elected", num_partitions=1, replication_factor=3)])["elected"].result(30)

    def state():
        """(leader, preferred replica) of partition 0, or None."""
        described = admin.list_topics("elected", timeout=5).topics.get("elected")
        partition = described.partitions.get(0) if described is not None else None
        if partition is None or partition.leader < 0 or not partition.replicas:
            return None
        return partition.leader, partition.replicas[0]

    def elect():
        """The error code of a preferred election of partition 0 (0: started), or None when the
        node kafka-python takes for the controller cannot be reached yet (just restarted, it
        may be named controller before it is listed as a live broker)."""
        from kafka.errors import KafkaConnectionError, NodeNotReadyError, UnknownBrokerIdError

        python_admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
        try:
            response = python_admin.elect_leaders(0, {"elected": [0]}, raise_errors=False)
        except (KafkaConnectionError, NodeNotReadyError, UnknownBrokerIdError):
            return None
        finally:
            python_admin.close()
        ((topic, partitions),) = [(r[0], r[1]) for r in response.replica_election_results]
        assert topic == "elected"
        ((index, code, _message),) = partitions
        assert index == 0
        return code

    leader, preferred = wait_for("a leader", state, timeout=30)
    if leader == preferred:
        # Move leadership away: the preferred replica is killed, another takes over.
        victim = node_of(cluster, admin, preferred)
        victim.kill()
        others = ",".join(n.kafka for n in cluster.nodes if n is not victim)
        from confluent_kafka.admin import AdminClient

        survivors = AdminClient({"bootstrap.servers": others})
        wait_for("another leader", lambda: (d := survivors.list_topics("elected", timeout=5).topics["elected"])
                 and d.partitions[0].leader not in (-1, preferred), timeout=30)
        victim.launch()
        victim.wait_ready(FORM_TIMEOUT)
    leader, preferred = wait_for("a leader", state, timeout=30)
    assert leader != preferred, "automatic rebalancing is off: nothing moved leadership back"
    # Until the preferred replica has caught up, the election is refused; then it starts.
    code = wait_for("an election that starts",
                    lambda: (c := elect()) not in (None, PreferredLeaderNotAvailableError.errno) and (c,),
                    timeout=30)[0]
    assert code == 0, code
    wait_for("the preferred replica to lead", lambda: (s := state()) and s[0] == s[1], timeout=10)
    assert wait_for("an answer to a second election", lambda: (c := elect()) is not None and (c,),
                    timeout=30)[0] == ElectionNotNeededError.errno

    # Every node holds a replica of the topic in its one log directory (once every node counts
    # the restarted one live again, Metadata lists three brokers).
    wait_for("three live brokers", lambda: all(live_brokers(n) == 3 for n in cluster.nodes), timeout=20)
    python_admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        described = python_admin.describe_log_dirs()
        brokers = {b.node_id for b in python_admin._manager.cluster.brokers()}
    finally:
        python_admin.close()
    by_broker = {result["broker"]: result for result in described}
    assert set(by_broker) == brokers and len(brokers) == 3, (set(by_broker), brokers)
    for result in by_broker.values():
        (log_dir,) = result["log_dirs"]
        assert log_dir["error_code"] == 0 and log_dir["log_dir"].endswith("logs"), log_dir
        topics = {t["name"]: t for t in log_dir["topics"]}
        assert [p["partition_index"] for p in topics["elected"]["partitions"]] == [0], topics


def test_a_stopping_leader_hands_over_before_it_stops(nodes_factory):
    """A node stopped gracefully (SIGTERM) hands the leadership of the partitions it leads to a
    caught-up follower first (Kafka's controlled shutdown), before it stops serving clients;
    the producer writing meanwhile loses nothing acknowledged, and the node exits cleanly."""
    import signal

    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    cluster, bootstrap, admin = three_nodes(nodes_factory)
    admin.create_topics([NewTopic("handed", num_partitions=1, replication_factor=3)])["handed"].result(30)
    wait_for("the preferred replica to lead", lambda: preferred_leads(admin, "handed"), timeout=30)
    leader = partition_state(admin, "handed")[0]
    victim = node_of(cluster, admin, leader)
    others = [node for node in cluster.nodes if node is not victim]
    survivors = AdminClient({"bootstrap.servers": ",".join(node.kafka for node in others)})

    acked = []
    failures = []
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 5, "message.timeout.ms": 30000})

    def delivered(error, message):
        if error is not None:
            failures.append(str(error))
        else:
            acked.append(int(message.value()))

    def send(start, count):
        for value in range(start, start + count):
            producer.produce("handed", str(value).encode(), partition=0, on_delivery=delivered)
            producer.poll(0)
        assert producer.flush(30) == 0

    send(0, 200)
    signalled = time.monotonic()
    victim.process.send_signal(signal.SIGTERM)
    wait_for("another leader", lambda: (s := partition_state(survivors, "handed")) and s[0] != leader,
             timeout=8, interval=0.1)
    handed_after = time.monotonic() - signalled
    assert handed_after < 5, f"leadership moved {handed_after:.1f} s after the signal"
    send(200, 200)
    assert victim.process.wait(timeout=30) == 0
    handed = [line for line in victim.log_path.read_text().splitlines()
              if "handed over the leadership of partitions led here" in line]
    assert len(handed) == 1 and "partitions=1" in handed[0], victim.log_tail(30)
    assert not failures, failures[:5]
    assert sorted(acked) == list(range(400))
    read = read_back(",".join(node.kafka for node in others), "handed", 400)
    assert sorted(value for value, _ in read) == list(range(400))


def test_a_node_without_a_replica_names_the_leader_the_replicas_report(nodes_factory):
    """Four nodes, replication factor 3: the node holding no replica of a partition names the
    leader that the replicas' nodes report in their answers to its pings — after the preferred
    leader is killed, the replica that took over, not the dead node."""
    from confluent_kafka.admin import AdminClient, NewTopic
    from conftest import run_cli

    cluster = nodes_factory(4).start()
    wait_for("a four-voter cluster", lambda: settled(cluster.nodes, 4))
    wait_for("four live brokers", lambda: all(live_brokers(n) == 4 for n in cluster.nodes), timeout=20)
    admin = AdminClient({"bootstrap.servers": ",".join(node.kafka for node in cluster.nodes)})
    admin.create_topics([NewTopic("elsewhere", num_partitions=1, replication_factor=3)])["elsewhere"].result(30)
    wait_for("the preferred replica to lead", lambda: preferred_leads(admin, "elsewhere"), timeout=30)
    leader, replicas, _ = partition_state(admin, "elsewhere")
    assert len(replicas) == 3, replicas
    holders = [node_of(cluster, admin, replica) for replica in replicas]
    outsider = next(node for node in cluster.nodes if all(node is not holder for holder in holders))

    def named_by_outsider():
        """The leader of partition 0 as the outsider's admin API (the same view as its Kafka
        Metadata) names it."""
        result = run_cli(outsider, "topic", "describe", "elsewhere", "--output", "json", check=False)
        return json.loads(result.stdout)["partitions"][0]["leader"] if result.returncode == 0 else None

    wait_for("the outsider to name the leader", lambda: named_by_outsider() == leader, timeout=10)
    node_of(cluster, admin, leader).kill()
    took_over = wait_for("the outsider to name the replica that took over",
                         lambda: (named := named_by_outsider()) in replicas and named != leader and named,
                         timeout=15, interval=0.2)
    # The survivors agree.
    survivors = AdminClient({"bootstrap.servers": ",".join(h.kafka for h in holders if h.process.poll() is None)})
    wait_for("the survivors to name the same leader",
             lambda: (state := partition_state(survivors, "elsewhere")) and state[0] == took_over, timeout=10)


def test_a_changed_segment_size_applies_to_every_replica_at_once(nodes_factory):
    """A replicated topic's `segment.bytes` changed by AlterConfigs takes effect on every
    replica without a restart: records produced afterwards roll segments at the new size on
    each node."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import ConfigResource, NewTopic

    cluster, bootstrap, admin = three_nodes(nodes_factory)
    admin.create_topics([NewTopic("resized", num_partitions=1, replication_factor=3)])["resized"].result(30)
    wait_for("a leader", lambda: partition_state(admin, "resized"), timeout=30)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                         "batch.size": 16384})

    def produce(count):
        for _ in range(count):
            producer.produce("resized", b"x" * 1024, partition=0)
            producer.poll(0)
        assert producer.flush(30) == 0

    def segments(node):
        return sorted((node.data_dir / "logs" / "resized-0").glob("*.log"))

    produce(500)
    assert all(len(segments(node)) == 1 for node in cluster.nodes), [segments(n) for n in cluster.nodes]
    resource = ConfigResource(ConfigResource.Type.TOPIC, "resized", set_config={"segment.bytes": "65536"})
    admin.alter_configs([resource])[resource].result(30)
    produce(1000)

    # About 1 MiB in batches of at most 16 KiB: several 64 KiB segments on every replica
    # (a segment may pass the size by one entry), where the old size gave one.
    wait_for("every replica to roll at the new size",
             lambda: all(len(segments(node)) >= 3 for node in cluster.nodes), timeout=20, interval=0.5)


def test_delete_records_and_retention_trim_every_replica_alike_and_survive_kills(nodes_factory):
    """DeleteRecords (confluent-kafka's AdminClient) and `retention.bytes` on an RF3 topic:
    every node's copy starts at the same offset afterwards and lost its segments below it,
    consumers and ListOffsets see the new start, and after every node is SIGKILLed and
    restarted the partition opens from its trimmed files, keeps its start and takes writes."""
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

    topic = "trimmed"
    cluster, bootstrap, admin = three_nodes(
        nodes_factory, env={"SLUICE_STORAGE__HOUSEKEEPING_INTERVAL_MS": "300"})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=3,
                                  config={"segment.bytes": "16384"})])[topic].result(30)
    wait_for("the preferred replica to lead", lambda: preferred_leads(admin, topic), timeout=30)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                         "batch.size": 4096, "enable.idempotence": True})

    def produce(first, count):
        for i in range(first, first + count):
            producer.produce(topic, str(i).encode() * 50, partition=0)
            producer.poll(0)
        assert producer.flush(30) == 0

    def copy_dir(node):
        return node.data_dir / "logs" / f"{topic}-0"

    def log_start(node):
        path = copy_dir(node) / "log-start-offset"
        return int(path.read_text()) if path.exists() else 0

    def segments(node):
        return sorted(copy_dir(node).glob("*.log"))

    def earliest():
        from confluent_kafka import KafkaException

        def ask():
            consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "earliest"})
            try:
                return consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
            except KafkaException:
                # Right after every node restarted, a new client may not know the partition yet
                # ("Unknown partition"): asked again.
                return None
            finally:
                consumer.close()

        return wait_for("the partition's watermarks", ask, timeout=30, interval=0.5)

    def first_value():
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g{time.monotonic()}",
                             "auto.offset.reset": "earliest", "enable.auto.commit": False})
        consumer.assign([TopicPartition(topic, 0, -2)])
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                message = consumer.poll(1)
                if message is not None and message.error() is None:
                    return message.offset(), message.value()
            raise AssertionError("nothing consumed")
        finally:
            consumer.close()

    produce(0, 3000)
    segments_before = {node.data_dir: len(segments(node)) for node in cluster.nodes}
    assert all(count > 5 for count in segments_before.values()), segments_before
    low, high = earliest()
    assert low == 0 and high >= 3000

    deleted = admin.delete_records([TopicPartition(topic, 0, 1000)])
    result = deleted[TopicPartition(topic, 0, 1000)].result(30)
    assert result.low_watermark == 1000, result.low_watermark
    wait_for("every replica to start at 1000",
             lambda: all(log_start(node) == 1000 for node in cluster.nodes), timeout=20)
    for node in cluster.nodes:
        assert len(segments(node)) < segments_before[node.data_dir], (node.data_dir, segments(node))
    assert earliest()[0] == 1000
    offset, value = first_value()
    assert offset == 1000, offset

    # retention.bytes: the leader's trims take whole segments, the same on every replica.
    entry = ConfigEntry("retention.bytes", "40000", incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[entry])
    admin.incremental_alter_configs([resource])[resource].result(30)

    def trimmed_alike():
        starts = {log_start(node) for node in cluster.nodes}
        return len(starts) == 1 and starts.pop() > 1000

    wait_for("retention to trim every replica alike", trimmed_alike, timeout=30, interval=0.2)
    start = log_start(cluster.nodes[0])
    for node in cluster.nodes:
        assert len(segments(node)) <= 5, (node.data_dir, segments(node))
    assert earliest()[0] == start

    # Every node killed and restarted: the trimmed logs open, keep their start, take writes.
    producer.flush(10)
    cluster.kill_all()
    for node in cluster.nodes:
        node.launch()
    for node in cluster.nodes:
        node.wait_ready(FORM_TIMEOUT)
    wait_for("a leader after the restart", lambda: partition_state(admin, topic), timeout=30)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    produce(3000, 10)
    low, high = earliest()
    assert low >= start and high >= 3010, (low, high, start)
    for node in cluster.nodes:
        assert log_start(node) >= start
