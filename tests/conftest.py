"""Fixtures that run the real `sluice` binary for integration tests.

Every broker listens on loopback with port 0 and its own data directory; the fixture reads the
bound addresses from the ready file and stops the process when the test ends, whatever happens.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def sluice_binary() -> Path:
    explicit = os.environ.get("SLUICE_BIN")
    if explicit:
        return Path(explicit)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "sluice"


def run_cli(sluice, *args, input=None, check=True, user="guest", password="guest"):
    """Runs the `sluice` command line against a broker's admin API; checks success by default."""
    env = dict(os.environ, SLUICE_URL=sluice.http, SLUICE_USER=user, SLUICE_PASSWORD=password)
    result = subprocess.run([str(sluice_binary()), *args], input=input, capture_output=True, text=True, env=env, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def die_with_parent():
    """A `preexec_fn` that makes the server die with the test process (Linux's
    PR_SET_PDEATHSIG), so a test run that crashes (a client library's abort) leaves no server
    behind. Only from the main thread: the signal follows the thread that started the child."""
    if threading.current_thread() is not threading.main_thread() or not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def arm():
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return arm


class Sluice:
    """One broker process. Restartable on the same data directory."""

    def __init__(self, data_dir: Path, log_path: Path, extra_args=(), env=None, host="127.0.0.1"):
        self.data_dir = data_dir
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.env = env or {}
        self.host = host
        self.process = None
        self.addresses = {}

    @property
    def kafka(self) -> str:
        return self.addresses["kafka"]

    @property
    def amqp(self) -> str:
        """host:port of the AMQP 0-9-1 listener."""
        return self.addresses["amqp"]

    @property
    def http(self) -> str:
        """Base URL of the admin API, metrics and console."""
        return "http://" + self.addresses["http"]

    @property
    def ready_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.ready"

    def start(self, timeout=30.0):
        self.launch()
        return self.wait_ready(timeout)

    def launch(self):
        """Starts the process without waiting for it to be ready (a cluster's first nodes are
        ready only once enough of them run)."""
        ready = self.ready_path
        if ready.exists():
            ready.unlink()
        # A restart keeps the ports, so clients reconnect to the same addresses.
        kafka_listen = self.addresses.get("kafka", f"{self.host}:0")
        amqp_listen = self.addresses.get("amqp", f"{self.host}:0")
        args = [
            str(sluice_binary()),
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--kafka-listen",
            kafka_listen,
            "--amqp-listen",
            amqp_listen,
            "--http-listen",
            self.addresses.get("http", f"{self.host}:0"),
            "--ready-file",
            str(ready),
            *self.extra_args,
        ]
        env = dict(os.environ)
        env.update(self.env)
        env.setdefault("SLUICE_LOG__LEVEL", "info")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=log, env=env, preexec_fn=die_with_parent())
        log.close()
        return self

    def wait_ready(self, timeout=30.0):
        ready = self.ready_path
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"sluice exited with {self.process.returncode}; see {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sluice did not become ready; see {self.log_path}")
            time.sleep(0.02)
        self.addresses = json.loads(ready.read_text())
        return self

    def stop(self, timeout=30.0) -> int:
        """Graceful stop (SIGTERM); returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self):
        """SIGKILL: no chance to flush anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()

    def restart(self):
        self.stop()
        return self.start()

    def freeze(self):
        """SIGSTOP: the process holds its connections but does nothing."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self):
        self.process.send_signal(signal.SIGCONT)

    def kill_and_restart(self, pause=0.0):
        self.kill()
        time.sleep(pause)
        return self.start()

    def log_tail(self, lines=40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture
def sluice_factory(tmp_path):
    started = []

    def make(name="broker", extra_args=(), env=None, host="127.0.0.1", wait=True):
        broker = Sluice(tmp_path / name, tmp_path / f"{name}.log", extra_args, env, host)
        started.append(broker)
        return broker.start() if wait else broker.launch()

    yield make
    for broker in started:
        broker.kill()


@pytest.fixture
def sluice(sluice_factory):
    """A broker with a short initial rebalance delay, so group tests do not idle."""
    return sluice_factory(env={"SLUICE_KAFKA__GROUP_INITIAL_REBALANCE_DELAY_MS": "200"})


def amqp_parameters(broker, **kwargs):
    """pika connection parameters for a broker's AMQP listener, as guest by default."""
    import pika

    host, port = broker.amqp.rsplit(":", 1)
    kwargs.setdefault("credentials", pika.PlainCredentials("guest", "guest"))
    kwargs.setdefault("heartbeat", 30)
    kwargs.setdefault("blocked_connection_timeout", 30)
    return pika.ConnectionParameters(host=host, port=int(port), **kwargs)


@pytest.fixture
def connect(sluice):
    """Opens pika connections to the `sluice` broker and closes them when the test ends."""
    import pika

    opened = []

    def make(broker=None, **kwargs):
        connection = pika.BlockingConnection(amqp_parameters(broker or sluice, **kwargs))
        opened.append(connection)
        return connection

    yield make
    for connection in opened:
        if connection.is_open:
            try:
                connection.close()
            except Exception:
                pass
