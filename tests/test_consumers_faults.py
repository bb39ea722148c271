"""RabbitMQ consumers under faults, against a private broker: poison messages, cut and silently dropped connections."""

import json
import signal
import socket
import threading
import time
import uuid

import pytest

from .conftest import require_binary, wait_for
from .test_consumers import RABBIT, Rabbit

real = [pytest.mark.realproc, pytest.mark.slow]


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory):
    require_binary(RABBIT, "rabbitmq-server")
    r = Rabbit(tmp_path_factory.mktemp("rabbit-faults")).start()
    yield r
    r.shutdown()


@pytest.fixture
def queue():
    """A queue of the test's own, so nothing another test left behind is in it."""
    return "gq-fault-%s" % uuid.uuid4().hex[:8]


class Proxy:
    """A TCP proxy in threads between consumer and broker that can cut or silently drop its connections."""

    def __init__(self, upstream_port):
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.silent = False  # new connections are swallowed too
        self.lock = threading.Lock()
        self.pairs = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self):
        return "amqp://guest:guest@127.0.0.1:%d//" % self.port

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                pair = {"client": client, "upstream": None, "silent": self.silent}
                if not self.silent:
                    pair["upstream"] = socket.create_connection(self.upstream)
                self.pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair, "client", "upstream"), daemon=True).start()
            if pair["upstream"] is not None:
                threading.Thread(target=self._pump, args=(pair, "upstream", "client"), daemon=True).start()

    def _pump(self, pair, src, dst):
        while True:
            try:
                data = pair[src].recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if pair["silent"] or pair[dst] is None:
                continue  # read and drop: the sender's TCP stack sees its bytes acknowledged, as on a dead route
            try:
                pair[dst].sendall(data)
            except OSError:
                break
        # A silent path passes no close either: each side has to notice on its own.
        _close(pair[src])
        if not pair["silent"] and pair[dst] is not None:
            _close(pair[dst])

    def silent_drop(self):
        """Stop forwarding anything, on every connection, without closing a socket (a vanished route)."""
        with self.lock:
            self.silent = True
            for pair in self.pairs:
                pair["silent"] = True

    def cut(self):
        """Close both sides of every connection now."""
        with self.lock:
            for pair in self.pairs:
                _close(pair["client"])
                _close(pair["upstream"])

    def restore(self):
        """Forward new connections again (the swallowed ones stay dead)."""
        with self.lock:
            self.silent = False

    def close(self):
        self.listener.close()
        self.cut()


def _close(sock):
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture
def proxy(rabbit):
    p = Proxy(rabbit.port)
    yield p
    p.close()


def publish(url, queue, *bodies):
    from kombu import Connection, Queue
    with Connection(url) as conn:
        producer = conn.Producer()
        for body in bodies:
            producer.publish(body, routing_key=queue, declare=[Queue(queue, durable=True)], serializer="json",
                             delivery_mode=2)


def depth(url, queue):
    from amqp.exceptions import NotFound
    from kombu import Connection
    with Connection(url) as conn:
        try:
            return conn.default_channel.queue_declare(queue, passive=True).message_count
        except NotFound:
            return 0


def take(url, queue):
    """Fetch (and acknowledge) one message from ``queue``: its properties, headers and decoded body."""
    from kombu import Connection
    with Connection(url) as conn:
        raw = conn.default_channel.basic_get(queue, no_ack=True)
        return raw.properties, raw.headers, json.loads(raw.body)


def ledger(tmp_path):
    try:
        return [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    except FileNotFoundError:
        return []


def attempts(tmp_path, n):
    return [r for r in ledger(tmp_path) if r["kind"] == "attempt" and r["n"] == n]


def done(tmp_path):
    return {r["n"] for r in ledger(tmp_path) if r["kind"] == "done"}


def fault_server(server_factory, url, queue, tmp_path, **env):
    settings = {"GQ_TEST_AMQP_URL": url, "GQ_TEST_QUEUE": queue, "GQ_TEST_OUT": str(tmp_path)}
    settings.update({k: str(v) for k, v in env.items()})
    return server_factory("tests.apps.consumer_fault_app:app", env=settings)


def state(srv):
    import requests
    return requests.get(srv.url + "/consumer", timeout=5).json()


def stays(predicate, seconds, message):
    """Assert ``predicate`` holds all along the next ``seconds`` (a bug shown by what does not happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), message
        time.sleep(0.1)


# -- poison messages -------------------------------------------------------------------------------------------

@pytest.mark.realproc
@pytest.mark.slow
def test_a_poison_message_goes_to_the_dead_letter_queue_after_max_deliveries(server_factory, rabbit, queue,
                                                                             tmp_path):
    srv = fault_server(server_factory, rabbit.url, queue, tmp_path)  # max_deliveries: the default, 5
    publish(rabbit.url, queue, {"n": 0, "poison": True}, *({"n": i} for i in range(1, 6)))
    wait_for(lambda: depth(rabbit.url, queue + ".dead") == 1, 30, message="the poison message dead-lettered")
    wait_for(lambda: done(tmp_path) >= {1, 2, 3, 4, 5}, 30, message="the good messages behind it")
    # One more after the dead letter: once it is through, nothing of the poison message is still in flight.
    publish(rabbit.url, queue, {"n": 6})
    wait_for(lambda: 6 in done(tmp_path), 30, message="a message published after the dead letter")

    assert len(attempts(tmp_path, 0)) == 5, ledger(tmp_path)
    assert [a["deliveries"] for a in attempts(tmp_path, 0)] == [1, 2, 3, 4, 5]
    assert all(len(attempts(tmp_path, n)) == 1 for n in range(1, 7))
    assert depth(rabbit.url, queue) == 0

    props, headers, body = take(rabbit.url, queue + ".dead")
    assert body == {"n": 0, "poison": True}
    assert headers["x-greenqueue-deliveries"] == 5
    assert headers["x-greenqueue-exception"] == "ValueError"
    assert headers["x-greenqueue-queue"] == queue
    trace = headers["x-greenqueue-traceback"]
    assert trace.startswith("Traceback (most recent call last)") and "ValueError: poison message 0" in trace
    assert "consumer_fault_app.py" in trace and props["delivery_mode"] == 2

    # Durable: redeclaring it durable is equivalent, transient is refused.
    from amqp.exceptions import PreconditionFailed
    from kombu import Connection
    with Connection(rabbit.url) as conn:
        conn.default_channel.queue_declare(queue + ".dead", durable=True, auto_delete=False)
    with Connection(rabbit.url) as conn, pytest.raises(PreconditionFailed):
        conn.default_channel.queue_declare(queue + ".dead", durable=False, auto_delete=False)

    log = srv.log()
    lines = [line for line in log.splitlines() if "dead-lettered to" in line]
    assert len(lines) == 1, log
    assert props["message_id"] in lines[0] and "after 5 deliveries" in lines[0] and "move it back" in lines[0]
    assert state(srv)["dead_lettered"] == 1


@pytest.mark.realproc
@pytest.mark.slow
def test_the_delivery_count_survives_a_consumer_restart(server_factory, rabbit, queue, tmp_path):
    env = dict(GQ_TEST_MAX_DELIVERIES=4, GQ_TEST_HANDLE_SECONDS=0.3)
    first = fault_server(server_factory, rabbit.url, queue, tmp_path, **env)
    publish(rabbit.url, queue, {"n": 0, "poison": True})
    wait_for(lambda: len(attempts(tmp_path, 0)) >= 2, 20, message="two attempts")
    assert first.stop(signal.SIGTERM) == 0  # finishes the attempt in hand: it is sent back counted
    before = len(attempts(tmp_path, 0))
    assert before < 4, "the first server dead-lettered it already; the restart proved nothing"
    fault_server(server_factory, rabbit.url, queue, tmp_path, **env)
    wait_for(lambda: depth(rabbit.url, queue + ".dead") == 1, 30, message="the dead letter after the restart")
    assert len(attempts(tmp_path, 0)) == 4, ledger(tmp_path)
    assert take(rabbit.url, queue + ".dead")[1]["x-greenqueue-deliveries"] == 4


# -- heartbeats and keepalive ----------------------------------------------------------------------------------

@pytest.mark.realproc
@pytest.mark.slow
def test_heartbeat_and_keepalive_are_on_by_default(server_factory, rabbit, queue, tmp_path):
    srv = fault_server(server_factory, rabbit.url, queue, tmp_path)
    wait_for(lambda: state(srv)["connected"], 20, message="the consumer connected")
    s = state(srv)
    assert s["heartbeat"] == 30  # the default, below RabbitMQ's 60 s, so ours is negotiated
    assert s["socket"] == {"SO_KEEPALIVE": 1, "TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 6}


@pytest.mark.realproc
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["cut", "silent"])
def test_the_consumer_survives_a_lost_connection(server_factory, rabbit, proxy, queue, tmp_path, fault):
    srv = fault_server(server_factory, proxy.url(), queue, tmp_path, GQ_TEST_HEARTBEAT=2)
    publish(rabbit.url, queue, {"n": 1})
    wait_for(lambda: done(tmp_path) == {1}, 20, message="the first message")
    assert state(srv)["heartbeat"] == 2
    if fault == "cut":
        proxy.cut()
        publish(rabbit.url, queue, {"n": 2})
        wait_for(lambda: "reconnect attempt" in srv.log(), 20, message="a reconnect after the cut")
    else:
        # celery#8082: no FIN, no RST, nothing; only missing heartbeats can tell.
        dropped_at = time.monotonic()
        proxy.silent_drop()
        publish(rabbit.url, queue, {"n": 2})
        wait_for(lambda: "presumed dropped" in srv.log(), 20, message="heartbeats noticing the dropped path")
        assert time.monotonic() - dropped_at < 10  # two 2 s heartbeats, checked every second
        assert 2 not in done(tmp_path)  # the path is still silent: nothing got through
        proxy.restore()
    publish(rabbit.url, queue, {"n": 3})
    wait_for(lambda: done(tmp_path) >= {1, 2, 3}, 40, message="messages published after the fault\n" + srv.log())
    assert depth(rabbit.url, queue) == 0


@pytest.mark.realproc
@pytest.mark.slow
def test_without_heartbeats_a_silent_drop_stalls_the_consumer(server_factory, rabbit, proxy, queue, tmp_path):
    """The control for the silent case above: heartbeat=0 is the bug, the consumer never notices."""
    srv = fault_server(server_factory, proxy.url(), queue, tmp_path, GQ_TEST_HEARTBEAT=0)
    publish(rabbit.url, queue, {"n": 1})
    wait_for(lambda: done(tmp_path) == {1}, 20, message="the first message")
    proxy.silent_drop()
    publish(rabbit.url, queue, {"n": 2})
    proxy.restore()
    # Twice the time the 2 s heartbeat above needs to notice.
    stays(lambda: 2 not in done(tmp_path) and "reconnect attempt" not in srv.log(), 8,
          "a consumer without heartbeats noticed a silently dropped connection")


def test_bad_fault_settings_are_clear_errors():
    from greenqueue import ConfigError
    from greenqueue.consumers import Consumer

    def make(**kw):
        return Consumer(lambda m: None, "amqp://localhost//", queues=["q"], **kw)

    with pytest.raises(ConfigError, match="max_deliveries must be an integer >= 1"):
        make(max_deliveries=0)
    with pytest.raises(ConfigError, match="heartbeat must be seconds"):
        make(heartbeat=-1)
    with pytest.raises(ConfigError, match="keepalive must be"):
        make(keepalive=(60, 10))
    c = make(heartbeat=None, keepalive=None, max_deliveries=None)
    assert (c.heartbeat, c.keepalive, c.max_deliveries) == (0, None, None)
    assert c.reader.transport_options() == {}
    assert make().reader.transport_options() == {"socket_settings": {
        socket.TCP_KEEPIDLE: 60, socket.TCP_KEEPINTVL: 10, socket.TCP_KEEPCNT: 6}}


def test_a_dead_lettered_message_counts_as_rejected():
    from greenqueue import events
    from greenqueue.consumers import Consumer, Message

    from .test_consumers import FakeRaw

    sent_back = []

    def redeliver(m, error):
        sent_back.append((m.deliveries, type(error).__name__))
        return "dead" if m.deliveries >= 5 else "requeue"

    def handler(messages):
        raise ValueError("boom")

    seen = []
    unsubscribe = events.subscribe(seen.append, events.MessagesFailed)
    try:
        c = Consumer(handler, "amqp://localhost//", queues=["q"], batch_size=2)
        batch = [Message({"n": i}, id=i, raw=FakeRaw(), deliveries=d, redeliver=redeliver) for i, d in ((1, 5), (2, 1))]
        assert c.handle(batch) is False
    finally:
        unsubscribe()
    assert sent_back == [(5, "ValueError"), (1, "ValueError")]
    assert [m.settled for m in batch] == ["dead", "requeue"]
    (e,) = seen
    assert (e.requeued, e.rejected) == (1, 1)
