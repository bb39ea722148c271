"""@consume with a real RabbitMQ broker started by the test, and a real SSE source server."""

import json
import os
import signal
import subprocess

import pytest

from .conftest import free_port, require_binary, wait_for

pytestmark = [pytest.mark.realproc, pytest.mark.slow]

RABBIT = "/usr/lib/rabbitmq/bin/rabbitmq-server"
QUEUE = "gq-test"


class Rabbit:
    """A private rabbitmq-server: its own ports, node name and data directory."""

    def __init__(self, base):
        self.base = base
        self.port, self.dist, self.epmd = free_port(), free_port(), free_port()
        base.mkdir(exist_ok=True)
        (base / "plugins").write_text("[].\n")
        self.env = dict(os.environ, HOME=str(base), RABBITMQ_NODE_PORT=str(self.port),
                        RABBITMQ_NODENAME="gqtest%d@localhost" % self.port, RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
                        RABBITMQ_LOG_BASE=str(base / "log"), RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "plugins"),
                        RABBITMQ_DIST_PORT=str(self.dist), ERL_EPMD_PORT=str(self.epmd),
                        RABBITMQ_PID_FILE=str(base / "pid"), RABBITMQ_CONFIG_FILE=str(base / "rabbitmq"),
                        RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
                        RABBITMQ_CONF_ENV_FILE=str(base / "env.conf"))
        self.proc = None

    @property
    def url(self):
        return "amqp://guest:guest@127.0.0.1:%d//" % self.port

    def start(self):
        self.proc = subprocess.Popen([RABBIT], env=self.env, cwd=str(self.base), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)

        def up():
            assert self.proc.poll() is None, "rabbitmq-server exited %s" % self.proc.returncode
            from kombu import Connection
            try:
                with Connection(self.url, connect_timeout=1) as c:
                    c.ensure_connection(max_retries=1)
                return True
            except Exception:
                return False
        wait_for(up, 60, interval=0.2, message="rabbitmq-server")
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def shutdown(self):
        self.stop()
        subprocess.run(["epmd", "-port", str(self.epmd), "-kill"], env=self.env, capture_output=True, timeout=10)

    def queue_depth(self):
        from kombu import Connection
        with Connection(self.url) as c:
            return c.default_channel.queue_declare(QUEUE, passive=True).message_count

    def purge(self):
        from kombu import Connection
        with Connection(self.url) as c:
            c.default_channel.queue_declare(QUEUE, durable=True, auto_delete=False)
            c.default_channel.queue_purge(QUEUE)


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory):
    require_binary(RABBIT, "rabbitmq-server")
    r = Rabbit(tmp_path_factory.mktemp("rabbit")).start()
    yield r
    r.shutdown()


@pytest.fixture
def broker(rabbit):
    rabbit.purge()
    return rabbit


def publish(url, *bodies):
    from greenqueue.consumers import publish as pub
    for body in bodies:
        pub(url, QUEUE, body)


def records(tmp_path, name="consumed.jsonl"):
    try:
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
    except FileNotFoundError:
        return []


def done_bodies(tmp_path):
    return [b["n"] for r in records(tmp_path) if r["kind"] == "done" for b in r["bodies"]]


def consumer_server(server_factory, broker, tmp_path, **env):
    settings = {"GQ_TEST_AMQP_URL": broker.url, "GQ_TEST_OUT": str(tmp_path)}
    settings.update({k: str(v) for k, v in env.items()})
    return server_factory("tests.apps.consumer_app:app", env=settings)


def test_messages_are_handled_in_batches_next_to_the_web_app(server_factory, broker, tmp_path):
    publish(broker.url, *({"n": i} for i in range(10)))
    srv = consumer_server(server_factory, broker, tmp_path, GQ_TEST_BATCH=5, GQ_TEST_INTERVAL=5)
    wait_for(lambda: len(done_bodies(tmp_path)) == 10, 20, message="10 messages")
    sizes = [len(r["bodies"]) for r in records(tmp_path) if r["kind"] == "done"]
    assert sizes == [5, 5]
    import requests
    assert requests.get(srv.url + "/consumer", timeout=5).json() == {"handled": 10, "failed": 0}
    wait_for(lambda: broker.queue_depth() == 0, 10, message="every message acknowledged")


def test_a_partial_batch_goes_after_the_interval(server_factory, broker, tmp_path):
    consumer_server(server_factory, broker, tmp_path, GQ_TEST_BATCH=50, GQ_TEST_INTERVAL=0.3)
    publish(broker.url, {"n": 1}, {"n": 2}, {"n": 3})
    wait_for(lambda: sorted(done_bodies(tmp_path)) == [1, 2, 3], 15, message="the partial batch")


def test_failure_requeues_and_the_message_is_redelivered(server_factory, broker, tmp_path):
    consumer_server(server_factory, broker, tmp_path, GQ_TEST_BATCH=1, GQ_TEST_INTERVAL=0.1)
    publish(broker.url, {"n": 1, "fail_once": True}, {"n": 2})
    wait_for(lambda: sorted(done_bodies(tmp_path)) == [1, 2], 20, message="the redelivered message")
    assert [r["bodies"][0]["n"] for r in records(tmp_path) if r["kind"] == "fail"] == [1]
    wait_for(lambda: broker.queue_depth() == 0, 10)


def test_broker_restart_mid_stream_loses_nothing(server_factory, broker, tmp_path):
    srv = consumer_server(server_factory, broker, tmp_path, GQ_TEST_BATCH=2, GQ_TEST_INTERVAL=0.1,
                          GQ_TEST_HANDLE_SECONDS=0.05)
    publish(broker.url, *({"n": i} for i in range(40)))
    wait_for(lambda: len(done_bodies(tmp_path)) >= 4, 20, message="the first batches")
    broker.stop()
    wait_for(lambda: "reconnect attempt" in srv.log(), 20, message="a logged reconnect attempt")
    broker.start()
    wait_for(lambda: set(done_bodies(tmp_path)) >= set(range(40)), 60, message="all 40 messages after the restart")
    wait_for(lambda: broker.queue_depth() == 0, 20)


def test_sigterm_finishes_the_batch_in_hand(server_factory, broker, tmp_path):
    srv = consumer_server(server_factory, broker, tmp_path, GQ_TEST_BATCH=3, GQ_TEST_INTERVAL=0.2,
                          GQ_TEST_HANDLE_SECONDS=1)
    publish(broker.url, {"n": 1}, {"n": 2}, {"n": 3})
    wait_for(lambda: any(r["kind"] == "start" for r in records(tmp_path)), 15, message="the batch to start")
    srv.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    assert sorted(done_bodies(tmp_path)) == [1, 2, 3]
    assert broker.queue_depth() == 0
    assert "consumers stopped" in srv.log()


def test_sse_source_in_batches_with_reconnect_and_last_event_id(server_factory, tmp_path):
    source = server_factory("tests.apps.sse_source_app:app")
    consumer = server_factory("tests.apps.sse_source_app:app", env={
        "SSE_SOURCE": "sse+" + source.url + "/events", "GQ_TEST_OUT": str(tmp_path)})
    wait_for(lambda: sum(len(r["ids"]) for r in records(tmp_path, "sse.jsonl")) >= 12, 20,
             message="all 12 events")
    got = [i for r in records(tmp_path, "sse.jsonl") for i in r["ids"]]
    # The batch holding event 7 failed once and was read again from the last good event.
    assert got == [str(i) for i in range(1, 13)]
    assert all(len(r["ids"]) <= 3 for r in records(tmp_path, "sse.jsonl"))
    assert records(tmp_path, "sse.jsonl")[0]["events"][0] == "tick"
    assert records(tmp_path, "sse.jsonl")[0]["bodies"][0] == {"i": 1}
    assert "batch with event 7 fails once" in consumer.log()


def test_bad_sources_are_clear_errors():
    from greenqueue import ConfigError
    from greenqueue.consumers import Consumer

    with pytest.raises(ConfigError, match="unknown source"):
        Consumer(lambda m: None, "kafka://x")
    with pytest.raises(ConfigError, match="name the queues"):
        Consumer(lambda m: None, "amqp://localhost//")
    with pytest.raises(ConfigError, match="batch_size"):
        Consumer(lambda m: None, "amqp://localhost//", queues=["q"], batch_size=0)
