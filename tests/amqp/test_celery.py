"""Celery over AMQP 0-9-1, as a new user runs it: a real prefork worker (a subprocess, concurrency
2) against the real broker, tasks sent from this process, results through `rpc://`.

Each test writes the tasks module to its own `tmp_path`, starts its own worker and kills the
worker's whole process group (main process and pool children) when it ends, whatever happens.
Every wait is bounded: worker start-up, results (`.get(timeout=...)`) and the test itself.

The last test is the reason this module exists: kombu reads any server whose `product` is not
"RabbitMQ" (or is RabbitMQ 4.0+) as following the AMQP 0-9-1 specification, so Celery sends its
prefetch changes with `global=False` and expects them to reach its running consumer; a plain task
must not wait behind countdown tasks the worker is holding. Sluice reads `basic.qos` that way
for clients built on py-amqp (see `QosReading` in crates/amqp/src/connection.rs).
"""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import celery  # noqa: F401 (pinned in tests/requirements.txt; a missing client must fail, not skip)
import pytest

WORKER_READY_S = 30.0
RESULT_S = 20.0

# The tasks module the worker imports. Task names are explicit so this process can send them by
# name from an app of its own. Tasks that must be observed from outside append a line to a file
# (single `write` calls on an O_APPEND file, atomic between the two pool processes).
TASKS = '''
import os
import time

from celery import Celery
from kombu import Queue


def make_app(broker_url):
    app = Celery("sluice_tasks", broker=broker_url, backend="rpc://")
    app.conf.update(
        task_queues=[
            Queue("celery"),
            Queue("second"),
            Queue("prio", queue_arguments={"x-max-priority": 10}),
        ],
        task_default_queue="celery",
        task_routes={"t.where": {"queue": "second"}},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
    )
    return app


app = make_app(os.environ.get("SLUICE_CELERY_BROKER", "amqp://"))


def note(path, line):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\\n").encode())
    finally:
        os.close(fd)


def lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


@app.task(name="t.add")
def add(x, y):
    return x + y


@app.task(name="t.stamp")
def stamp():
    return time.time()


@app.task(name="t.where", bind=True)
def where(self):
    return self.request.delivery_info.get("routing_key")


@app.task(name="t.record")
def record(path, label, seconds):
    note(path, label)
    time.sleep(seconds)
    return label


@app.task(name="t.flaky", bind=True, max_retries=2)
def flaky(self, path):
    note(path, "attempt")
    raise self.retry(exc=ValueError(f"attempt {len(lines(path))} failed"), countdown=0.2)


@app.task(name="t.late", bind=True, acks_late=True)
def late(self, path, started):
    note(path, "redelivered" if self.request.delivery_info.get("redelivered") else "first")
    if len(lines(path)) == 1:
        note(started, "started")
        time.sleep(60)
    return lines(path)
'''


def amqp_url(broker) -> str:
    return f"amqp://guest:guest@{broker.amqp}//"


def load_tasks(path: Path):
    """Imports the tasks module under a name of its own (every test writes a new one)."""
    spec = importlib.util.spec_from_file_location(f"sluice_tasks_{uuid.uuid4().hex}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Worker:
    """One `celery worker` process group."""

    def __init__(self, tmp_path: Path, broker, name: str, args=()):
        self.name = f"{name}@sluice-test"
        self.log_path = tmp_path / f"worker-{name}.log"
        env = dict(os.environ, SLUICE_CELERY_BROKER=amqp_url(broker), PYTHONPATH=str(tmp_path))
        command = [
            sys.executable, "-m", "celery", "-A", "sluice_tasks", "worker",
            "--pool", "prefork", "--concurrency", "2", "--loglevel", "info",
            "--hostname", self.name, "--without-gossip", "--without-mingle",
            *args,
        ]  # fmt: skip
        log = open(self.log_path, "ab")
        # A session of its own, so the pool's children die with it.
        self.process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def wait_ready(self, timeout=WORKER_READY_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            if " ready." in self.log_path.read_text(errors="replace"):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.log_tail()}")

    def kill(self):
        """SIGKILL to the whole group: the main process and every pool process (even if the main
        process already exited, its pool may not have)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)

    def log_tail(self, lines=40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def celery_env(sluice, tmp_path):
    """Writes the tasks module; yields (client app, start_worker). Kills every worker at the end."""
    path = tmp_path / "sluice_tasks.py"
    path.write_text(TASKS)
    module = load_tasks(path)
    client = module.make_app(amqp_url(sluice))
    workers = []

    def start_worker(name="w1", args=(), ready=True):
        worker = Worker(tmp_path, sluice, name, args)
        workers.append(worker)
        return worker.wait_ready() if ready else worker

    try:
        yield client, start_worker
    finally:
        for worker in workers:
            worker.kill()
        client.close()


pytestmark = pytest.mark.timeout(90)


def test_results_come_back_through_rpc(celery_env):
    client, start_worker = celery_env
    start_worker()
    results = [client.send_task("t.add", args=(i, i)) for i in range(10)]
    assert [r.get(timeout=RESULT_S) for r in results] == [2 * i for i in range(10)]
    assert all(r.state == "SUCCESS" for r in results)


def test_countdown_task_runs_after_its_countdown(celery_env):
    client, start_worker = celery_env
    start_worker()
    sent = time.time()
    ran_at = client.send_task("t.stamp", countdown=2).get(timeout=RESULT_S)
    assert 1.9 <= ran_at - sent < 6.0


def test_retries_end_in_failure_after_max_retries(celery_env, tmp_path):
    client, start_worker = celery_env
    start_worker()
    attempts = tmp_path / "attempts"
    result = client.send_task("t.flaky", args=(str(attempts),))
    with pytest.raises(Exception) as raised:
        result.get(timeout=RESULT_S)
    # The first run and two retries, then the task's own exception, not a lost result.
    assert type(raised.value).__name__ == "ValueError"
    assert "attempt 3 failed" in str(raised.value)
    assert result.state == "FAILURE"
    assert attempts.read_text().splitlines() == ["attempt"] * 3


def test_task_routed_to_a_second_queue(celery_env):
    client, start_worker = celery_env
    start_worker(args=("--queues", "celery,second"))
    assert client.send_task("t.where").get(timeout=RESULT_S) == "second"
    assert client.send_task("t.add", args=(1, 2)).get(timeout=RESULT_S) == 3


def test_inspect_ping_answers(celery_env, sluice, tmp_path):
    _, start_worker = celery_env
    worker = start_worker()
    env = dict(os.environ, SLUICE_CELERY_BROKER=amqp_url(sluice), PYTHONPATH=str(tmp_path))
    command = [sys.executable, "-m", "celery", "-A", "sluice_tasks", "inspect", "ping",
               "--destination", worker.name, "--timeout", "5"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"->\s+{re.escape(worker.name)}: OK\s+pong", result.stdout), result.stdout


def test_higher_priority_task_runs_first_from_a_priority_queue(celery_env, tmp_path):
    client, start_worker = celery_env
    order = tmp_path / "order"
    # Queued before any worker consumes, so the broker alone decides the order.
    pending = [client.send_task("t.record", args=(str(order), f"low{i}", 0.2), queue="prio", priority=0) for i in range(6)]
    pending.append(client.send_task("t.record", args=(str(order), "high", 0.2), queue="prio", priority=9))
    # Prefetch 2 (concurrency 2, multiplier 1): the worker holds only what the broker gave first.
    start_worker(args=("--queues", "prio", "--prefetch-multiplier", "1"))
    for result in pending:
        result.get(timeout=RESULT_S)
    ran = order.read_text().splitlines()
    assert sorted(ran) == sorted(["high"] + [f"low{i}" for i in range(6)])
    assert "high" in ran[:2], ran


def test_acks_late_task_is_redelivered_after_its_worker_is_killed(celery_env, tmp_path):
    client, start_worker = celery_env
    attempts, started = tmp_path / "attempts", tmp_path / "started"
    first = start_worker("first")
    result = client.send_task("t.late", args=(str(attempts), str(started)))
    deadline = time.monotonic() + RESULT_S
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), first.log_tail()
    first.kill()  # mid-task: the delivery was never acknowledged
    start_worker("second")
    assert result.get(timeout=RESULT_S) == ["first", "redelivered"]


def test_plain_task_is_not_delayed_behind_countdown_tasks(celery_env):
    """Twelve countdown tasks exceed the worker's prefetch (2 processes x 4 = 8); Celery raises its
    prefetch by one per task it holds (basic.qos with global=False, which kombu means in the
    specification's sense with any server but RabbitMQ 3.x), so the plain task sent after them
    must be delivered at once and run before any of them is due."""
    client, start_worker = celery_env
    start_worker()
    assert client.send_task("t.add", args=(0, 0)).get(timeout=RESULT_S) == 0
    held = [client.send_task("t.stamp", countdown=6) for _ in range(12)]
    time.sleep(0.5)  # the worker takes what its prefetch allows
    plain_ran_at = client.send_task("t.stamp").get(timeout=RESULT_S)
    held_ran_at = [r.get(timeout=RESULT_S) for r in held]
    assert plain_ran_at < min(held_ran_at), (
        f"the plain task ran {plain_ran_at - min(held_ran_at):.1f} s after the first countdown task: "
        "it waited behind the tasks the worker held"
    )
