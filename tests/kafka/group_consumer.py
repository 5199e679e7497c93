"""A consumer process for the group test.

Consumes with manual commits and writes each message to its output file only after the commit
that covers it succeeded, so the union of all outputs holds every committed message once.
With --pause-after N it stops polling after N messages (and a successful commit), writes a
marker file, and waits to be killed.
"""

import argparse
import sys
import time
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--pause-after", type=int, default=0)
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()

    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "partition.assignment.strategy": "range",
    })
    consumer.subscribe([args.topic])
    output = open(args.output, "a", buffering=1)
    done = 0
    while not Path(args.stop_file).exists():
        batch = consumer.consume(num_messages=args.batch, timeout=0.5)
        good = [m for m in batch if m.error() is None]
        for message in batch:
            if message.error() is not None and message.error().code() != KafkaError._PARTITION_EOF:
                print("consumer error:", message.error(), file=sys.stderr)
        if not good:
            continue
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as error:
            # The batch will be delivered again (to this or another member); do not record it.
            print("commit failed, batch discarded:", error, file=sys.stderr)
            continue
        for m in good:
            output.write(f"{m.partition()} {m.offset()} {m.key().decode()} {m.value().decode()}\n")
        done += len(good)
        if args.pause_after and done >= args.pause_after:
            Path(args.output + ".paused").write_text(str(done))
            while True:
                time.sleep(1)
    consumer.close()


if __name__ == "__main__":
    main()
