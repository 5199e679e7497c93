"""confluent-kafka (librdkafka) against Sluice: groups, rebalancing, restarts, idempotence."""

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

HERE = Path(__file__).resolve().parent


def create_topic(bootstrap, name, partitions, config=None):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})])
    futures[name].result(timeout=30)


def produce_keyed(bootstrap, topic, count, key_count):
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "linger.ms": 5,
        "batch.size": 262144,
        "compression.type": "lz4",
    })
    sequence = defaultdict(int)
    for i in range(count):
        key = f"key-{i % key_count}"
        producer.produce(topic, key=key, value=f"{sequence[key]}")
        sequence[key] += 1
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    return sequence


def read_outputs(paths):
    seen = []
    for path in paths:
        if path.exists():
            text = path.read_text()
            # A consumer may be writing its last line as it is read: only whole lines count.
            for line in text[: text.rfind("\n") + 1].splitlines():
                partition, offset, key, seq = line.split(" ")
                seen.append((int(partition), int(offset), key, int(seq), path.name))
    return seen


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_group_of_three_with_a_killed_member_and_a_broker_restart(sluice, tmp_path):
    total = 100_000
    topic = "events"
    create_topic(sluice.kafka, topic, 6)
    sequences = produce_keyed(sluice.kafka, topic, total, key_count=600)
    assert sum(sequences.values()) == total

    stop_file = tmp_path / "stop"
    outputs = [tmp_path / f"out-{name}.txt" for name in ("a", "b", "victim")]
    def start(name, output, pause_after=0):
        args = [sys.executable, str(HERE / "group_consumer.py"), "--bootstrap", sluice.kafka, "--topic", topic,
                "--group", "g1", "--output", str(output), "--stop-file", str(stop_file)]
        if pause_after:
            args += ["--pause-after", str(pause_after)]
        log = open(tmp_path / f"{name}.log", "w")
        return subprocess.Popen(args, stdout=log, stderr=log)

    consumers = [start("a", outputs[0]), start("b", outputs[1]), start("victim", outputs[2], pause_after=5_000)]
    try:
        # The victim stops after committing some messages; it is then killed outright.
        wait_for(lambda: Path(str(outputs[2]) + ".paused").exists(), 90, "the victim to pause")
        consumers[2].send_signal(signal.SIGKILL)
        consumers[2].wait()
        victim_count = len(read_outputs([outputs[2]]))
        assert victim_count >= 5_000

        # The others take over its partitions once its session expires: between them they
        # now consume all six partitions.
        def survivors_cover_every_partition():
            recent = [p for p, *_ in read_outputs(outputs[:2])]
            return set(recent[-20_000:]) == set(range(6)) or len(read_outputs(outputs)) >= total
        wait_for(survivors_cover_every_partition, 120, "the survivors to take over the victim's partitions")
        assert {p for p, *_ in read_outputs(outputs[:2])} == set(range(6))
        # Then the broker restarts while they are consuming.
        wait_for(lambda: len(read_outputs(outputs)) >= 70_000, 120, "70,000 messages consumed")
        sluice.restart()
        wait_for(lambda: len(read_outputs(outputs)) >= total, 180, "every message consumed")
    finally:
        stop_file.write_text("stop")
        for process in consumers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    seen = read_outputs(outputs)
    by_position = defaultdict(list)
    for partition, offset, key, seq, source in seen:
        by_position[(partition, offset)].append(source)
    duplicates = {pos: sources for pos, sources in by_position.items() if len(sources) > 1}
    assert not duplicates, f"{len(duplicates)} messages seen more than once, e.g. {list(duplicates.items())[:3]}"
    assert len(seen) == total, f"{len(seen)} of {total} messages seen"
    assert {p for p, _, _, _, _ in seen} == set(range(6))
    # Per-key order: each key lives in one partition, and its sequence grows with the offset.
    per_key = defaultdict(list)
    for partition, offset, key, seq, _ in seen:
        per_key[key].append((partition, offset, seq))
    for key, items in per_key.items():
        assert len({p for p, _, _ in items}) == 1, f"{key} spread over partitions"
        items.sort()
        assert [s for _, _, s in items] == list(range(sequences[key])), f"{key} out of order or incomplete"
    # The remaining members really did take over the victim's work.
    assert sum(1 for *_, source in seen if source != outputs[2].name) == total - victim_count

    # Committed offsets reached the end of every partition, and survive another restart.
    sluice.restart()
    consumer = Consumer({"bootstrap.servers": sluice.kafka, "group.id": "g1"})
    committed = consumer.committed([TopicPartition(topic, p) for p in range(6)], timeout=30)
    ends = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in range(6)]
    consumer.close()
    assert [tp.offset for tp in committed] == ends


def test_idempotent_producer_survives_broker_sigkill_without_duplicates_or_gaps(sluice_factory, tmp_path):
    # Debug logging shows the duplicates the broker caught, so the test can check it saw some.
    sluice = sluice_factory(env={"SLUICE_LOG__LEVEL": "sluice_broker::partition=debug,info"})
    topic = "ledger"
    # Each produce waits for its fsync before the response, widening the window in which a kill
    # finds a batch appended but not yet acknowledged.
    create_topic(sluice.kafka, topic, 2, config={"flush.messages": "1"})
    errors = []
    producer = Producer({
        "bootstrap.servers": sluice.kafka,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 1,
        "batch.num.messages": 200,
        "message.timeout.ms": 120_000,
        "socket.timeout.ms": 1_000,
        "retry.backoff.ms": 50,
        "reconnect.backoff.ms": 50,
    })
    def on_delivery(error, message):
        if error is not None:
            errors.append(error)
    total = 60_000
    chunk = 300
    # Warm up: the producer has its id and a connection before anything goes wrong.
    for i in range(chunk):
        producer.produce(topic, key=str(i % 2), value=str(i), partition=i % 2, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    sent = chunk
    # Disturbances at fifths of the stream: a freeze longer than the client's socket timeout
    # (the client gives up on an in-flight request and resends it, while the frozen broker
    # still appends the original once it runs again), then SIGKILLs with batches in flight.
    disturbances = ["freeze", "kill", "freeze", "kill"]
    thaw_at = None
    while sent < total:
        for i in range(sent, min(sent + chunk, total)):
            producer.produce(topic, key=str(i % 2), value=str(i), partition=i % 2, on_delivery=on_delivery)
        sent = min(sent + chunk, total)
        producer.poll(0)
        time.sleep(0.003)
        if thaw_at is not None and time.monotonic() >= thaw_at:
            sluice.thaw()
            thaw_at = None
        done = 4 - len(disturbances)
        if thaw_at is None and disturbances and sent >= total * (done + 1) // 5:
            if disturbances.pop(0) == "freeze":
                sluice.freeze()
                thaw_at = time.monotonic() + 2.5
            else:
                sluice.kill_and_restart(pause=0.3)
    if thaw_at is not None:
        time.sleep(max(0.0, thaw_at - time.monotonic()))
        sluice.thaw()
    assert producer.flush(120) == 0
    assert not errors, errors[:5]

    consumer = Consumer({"bootstrap.servers": sluice.kafka, "group.id": "verify", "auto.offset.reset": "earliest", "enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, 0, 0), TopicPartition(topic, 1, 0)])
    values = {0: [], 1: []}
    eof = set()
    deadline = time.monotonic() + 60
    while len(eof) < 2 and time.monotonic() < deadline:
        message = consumer.poll(1.0)
        if message is None:
            continue
        if message.error():
            eof.add(message.partition())
            continue
        values[message.partition()].append(int(message.value()))
    consumer.close()
    for partition in (0, 1):
        assert values[partition] == list(range(partition, total, 2)), f"partition {partition}: duplicates or gaps"
    assert "duplicate batch acknowledged" in sluice.log_path.read_text(), "no retried batch reached the broker: the test did not exercise deduplication"
