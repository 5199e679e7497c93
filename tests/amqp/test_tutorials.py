"""The classic RabbitMQ patterns, with pika, each asserting exactly which messages arrive where:
work queues, publish/subscribe, routing, topics, RPC (reply queue + correlation id, and direct
reply-to), and the original Java example's declare-and-bind."""

import uuid

import pika
import pytest

from amqp_helpers import Collector, bodies, drain, wait_for

PERSISTENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)


def test_work_queue_dispatches_fairly_to_two_workers_with_prefetch_one(connect):
    producer = connect().channel()
    producer.queue_declare("task_queue", durable=True)
    workers = [Collector(connect(), "task_queue", prefetch=1) for _ in range(2)]
    producer.confirm_delivery()
    tasks = [f"task {i}".encode() for i in range(6)]
    for task in tasks:
        producer.basic_publish("", "task_queue", task, PERSISTENT)

    # Each worker holds exactly one unacknowledged task: prefetch 1.
    for worker in workers:
        assert worker.wait(1)
    for worker in workers:
        worker.pump(0.3)
    assert [len(w.deliveries) for w in workers] == [1, 1]
    assert workers[0].bodies + workers[1].bodies == tasks[:2]

    # Acknowledging one task frees its worker for the next, and only it.
    handled = 2
    while handled < len(tasks):
        for worker in workers:
            worker.ack(worker.deliveries[-1][0])
            assert worker.wait(len(worker.deliveries) + 1)
            handled += 1
    for worker in workers:
        worker.pump(0.3)
        worker.ack(worker.deliveries[-1][0])
    assert workers[0].bodies == [tasks[0], tasks[2], tasks[4]]
    assert workers[1].bodies == [tasks[1], tasks[3], tasks[5]]
    assert all(m.redelivered is False for w in workers for m, _, _ in w.deliveries)
    assert all(p.delivery_mode == 2 for w in workers for _, p, _ in w.deliveries)
    # Every task acknowledged: nothing is left.
    assert producer.queue_declare("task_queue", passive=True).method.message_count == 0


def test_publish_subscribe_fans_out_to_every_bound_queue(connect):
    channel = connect().channel()
    channel.exchange_declare("logs", exchange_type="fanout")
    queues = []
    for _ in range(2):
        queue = channel.queue_declare("", exclusive=True).method.queue
        assert queue.startswith("amq.gen-")
        channel.queue_bind(queue, "logs")
        queues.append(queue)
    for line in (b"info: one", b"warning: two", b"error: three"):
        channel.basic_publish("logs", "ignored-by-fanout", line)
    late = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(late, "logs")
    for queue in queues:
        assert bodies(drain(channel, queue, 3)) == [b"info: one", b"warning: two", b"error: three"]
    assert drain(channel, late, 1, timeout=0.5) == []


def test_routing_with_a_direct_exchange_delivers_by_severity(connect):
    channel = connect().channel()
    channel.exchange_declare("direct_logs", exchange_type="direct")
    errors_only = channel.queue_declare("", exclusive=True).method.queue
    everything = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(errors_only, "direct_logs", routing_key="error")
    for severity in ("info", "warning", "error"):
        channel.queue_bind(everything, "direct_logs", routing_key=severity)
    for severity in ("info", "warning", "error", "debug"):
        channel.basic_publish("direct_logs", severity, f"{severity} message".encode())
    assert bodies(drain(channel, errors_only, 1)) == [b"error message"]
    assert bodies(drain(channel, everything, 3)) == [
        b"info message",
        b"warning message",
        b"error message",
    ]
    assert drain(channel, errors_only, 1, timeout=0.3) == []
    assert drain(channel, everything, 1, timeout=0.3) == []


def test_topics_match_stars_and_hashes(connect):
    channel = connect().channel()
    channel.exchange_declare("topic_logs", exchange_type="topic")
    q1 = channel.queue_declare("", exclusive=True).method.queue
    q2 = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(q1, "topic_logs", routing_key="*.orange.*")
    channel.queue_bind(q2, "topic_logs", routing_key="*.*.rabbit")
    channel.queue_bind(q2, "topic_logs", routing_key="lazy.#")
    keys = [
        "quick.orange.rabbit",
        "lazy.orange.elephant",
        "quick.orange.fox",
        "lazy.brown.fox",
        "lazy.pink.rabbit",
        "quick.brown.fox",
        "orange",
        "quick.orange.male.rabbit",
        "lazy.orange.male.rabbit",
    ]
    for key in keys:
        channel.basic_publish("topic_logs", key, key.encode())
    assert bodies(drain(channel, q1, 3)) == [
        b"quick.orange.rabbit",
        b"lazy.orange.elephant",
        b"quick.orange.fox",
    ]
    # lazy.pink.rabbit matches both of q2's bindings and is delivered once.
    assert bodies(drain(channel, q2, 5)) == [
        b"quick.orange.rabbit",
        b"lazy.orange.elephant",
        b"lazy.brown.fox",
        b"lazy.pink.rabbit",
        b"lazy.orange.male.rabbit",
    ]
    assert drain(channel, q1, 1, timeout=0.3) == []
    assert drain(channel, q2, 1, timeout=0.3) == []


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class RpcServer:
    """Answers fib(n) requests from `rpc_queue`, replying to reply_to with the correlation id."""

    def __init__(self, connection):
        self.connection = connection
        self.channel = connection.channel()
        self.channel.queue_declare("rpc_queue")
        self.channel.basic_qos(prefetch_count=1)
        self.channel.basic_consume("rpc_queue", self.on_request)
        self.served = []

    def on_request(self, channel, method, properties, body):
        self.served.append(properties.reply_to)
        channel.basic_publish(
            "",
            properties.reply_to,
            str(fib(int(body))).encode(),
            pika.BasicProperties(correlation_id=properties.correlation_id),
        )
        channel.basic_ack(method.delivery_tag)

    def pump(self):
        self.connection.process_data_events(time_limit=0.05)


def test_rpc_with_a_reply_queue_and_correlation_ids(connect):
    server = RpcServer(connect())
    client_connection = connect()
    client = client_connection.channel()
    callback_queue = client.queue_declare("", exclusive=True).method.queue
    responses = {}

    def on_response(channel, method, properties, body):
        responses[properties.correlation_id] = int(body)

    client.basic_consume(callback_queue, on_response, auto_ack=True)
    requests = {str(uuid.uuid4()): n for n in (1, 7, 30)}
    for correlation_id, n in requests.items():
        client.basic_publish(
            "",
            "rpc_queue",
            str(n).encode(),
            pika.BasicProperties(reply_to=callback_queue, correlation_id=correlation_id),
        )

    def answered():
        server.pump()
        client_connection.process_data_events(time_limit=0.05)
        return len(responses) == len(requests)

    assert wait_for(answered)
    assert responses == {cid: fib(n) for cid, n in requests.items()}
    assert set(server.served) == {callback_queue}


def test_rpc_with_direct_reply_to(connect):
    server = RpcServer(connect())
    client_connection = connect()
    client = client_connection.channel()
    responses = {}

    def on_response(channel, method, properties, body):
        responses[properties.correlation_id] = (int(body), method.consumer_tag, method.routing_key)

    tag = client.basic_consume("amq.rabbitmq.reply-to", on_response, auto_ack=True)
    requests = {str(uuid.uuid4()): n for n in (2, 10)}
    for correlation_id, n in requests.items():
        client.basic_publish(
            "",
            "rpc_queue",
            str(n).encode(),
            pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id=correlation_id),
        )

    def answered():
        server.pump()
        client_connection.process_data_events(time_limit=0.05)
        return len(responses) == len(requests)

    assert wait_for(answered)
    assert {cid: r[0] for cid, r in responses.items()} == {
        cid: fib(n) for cid, n in requests.items()
    }
    # The server saw a rewritten, per-channel address, and the reply came to our consumer.
    assert all(a.startswith("amq.rabbitmq.reply-to.") for a in server.served)
    assert all(r[1] == tag for r in responses.values())
    assert all(r[2].startswith("amq.rabbitmq.reply-to.") for r in responses.values())


def test_direct_reply_to_without_a_consumer_is_refused(connect):
    channel = connect().channel()
    channel.queue_declare("rpc_queue")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
        channel.basic_publish(
            "", "rpc_queue", b"1", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to")
        )
        channel.queue_declare("rpc_queue", passive=True)
    assert raised.value.reply_code == 406
    assert raised.value.reply_text == "PRECONDITION_FAILED - fast reply consumer does not exist"


def test_the_java_example_declares_publishes_then_fails_to_bind_to_a_missing_exchange(connect):
    # channel.queueDeclare("task_queue", true, false, false, null);
    # channel.basicPublish("", "task_queue", MessageProperties.PERSISTENT_TEXT_PLAIN, ...);
    channel = connect().channel()
    channel.queue_declare("task_queue", durable=True, exclusive=False, auto_delete=False)
    channel.basic_publish(
        "",
        "task_queue",
        b"Hello World!",
        pika.BasicProperties(content_type="text/plain", delivery_mode=2),
    )
    # channel.queueBind("hello", "exchange", "routingKey"); the exchange was never declared.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
        channel.queue_bind("hello", "exchange", routing_key="routingKey")
    assert raised.value.reply_code == 404
    assert raised.value.reply_text == "NOT_FOUND - no exchange 'exchange' in vhost '/'"
    # A channel error leaves the connection and the message in place.
    other = channel.connection.channel()
    method, properties, body = other.basic_get("task_queue", auto_ack=True)
    assert body == b"Hello World!"
    assert properties.content_type == "text/plain"
    assert properties.delivery_mode == 2
