"""aiokafka smoke test: produce and consume with a group."""

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


def test_aiokafka_produce_and_consume(sluice):
    async def run():
        producer = AIOKafkaProducer(bootstrap_servers=sluice.kafka, enable_idempotence=True)
        await producer.start()
        try:
            for i in range(200):
                await producer.send("aio", key=b"k%d" % (i % 4), value=b"v%d" % i)
            await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer("aio", bootstrap_servers=sluice.kafka, group_id="aio-group", auto_offset_reset="earliest")
        await consumer.start()
        got = []
        try:
            while len(got) < 200:
                batch = await asyncio.wait_for(consumer.getmany(timeout_ms=1000), timeout=30)
                for records in batch.values():
                    got.extend(r.value for r in records)
            await consumer.commit()
            committed = await consumer.committed(next(iter(consumer.assignment())))
        finally:
            await consumer.stop()
        return got, committed

    got, committed = asyncio.run(run())
    assert sorted(got) == sorted(b"v%d" % i for i in range(200))
    assert committed == 200
