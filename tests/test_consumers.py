"""@consume with a real RabbitMQ broker started by the test, a real SSE source server, and batch tasks."""

import json
import os
import signal
import subprocess

import gevent
import pytest
from gevent.event import Event

from greenqueue import events
from greenqueue.tasks import CANCELLED, FAILURE, SUCCESS, PerItem, task

from .conftest import free_port, require_binary, wait_for

real = [pytest.mark.realproc, pytest.mark.slow]
WAIT = 5

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


@pytest.fixture(autouse=True)
def _forget_consumers():
    yield
    from greenqueue import consumers
    consumers.reset()


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
    return server_factory("tests.apps.consumer_app:app", "--metrics-path", "/-/metrics", env=settings)


@pytest.mark.realproc
@pytest.mark.slow
def test_messages_are_handled_in_batches_next_to_the_web_app(server_factory, broker, tmp_path):
    publish(broker.url, *({"n": i} for i in range(10)))
    srv = consumer_server(server_factory, broker, tmp_path, GQ_TEST_BATCH=5, GQ_TEST_INTERVAL=5)
    wait_for(lambda: len(done_bodies(tmp_path)) == 10, 20, message="10 messages")
    sizes = [len(r["bodies"]) for r in records(tmp_path) if r["kind"] == "done"]
    assert sizes == [5, 5]
    import requests
    assert requests.get(srv.url + "/consumer", timeout=5).json() == {"handled": 10, "failed": 0, "requeued": 0,
                                                                     "rejected": 0}
    wait_for(lambda: broker.queue_depth() == 0, 10, message="every message acknowledged")


@pytest.mark.realproc
@pytest.mark.slow
def test_a_partial_batch_goes_after_the_interval(server_factory, broker, tmp_path):
    consumer_server(server_factory, broker, tmp_path, GQ_TEST_BATCH=50, GQ_TEST_INTERVAL=0.3)
    publish(broker.url, {"n": 1}, {"n": 2}, {"n": 3})
    wait_for(lambda: sorted(done_bodies(tmp_path)) == [1, 2, 3], 15, message="the partial batch")


@pytest.mark.realproc
@pytest.mark.slow
def test_failure_requeues_and_the_message_is_redelivered(server_factory, broker, tmp_path):
    consumer_server(server_factory, broker, tmp_path, GQ_TEST_BATCH=1, GQ_TEST_INTERVAL=0.1)
    publish(broker.url, {"n": 1, "fail_once": True}, {"n": 2})
    wait_for(lambda: sorted(done_bodies(tmp_path)) == [1, 2], 20, message="the redelivered message")
    assert [r["bodies"][0]["n"] for r in records(tmp_path) if r["kind"] == "fail"] == [1]
    wait_for(lambda: broker.queue_depth() == 0, 10)


@pytest.mark.realproc
@pytest.mark.slow
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


@pytest.mark.realproc
@pytest.mark.slow
def test_handler_settles_single_messages_of_a_batch(server_factory, broker, tmp_path):
    srv = consumer_server(server_factory, broker, tmp_path, GQ_TEST_BATCH=4, GQ_TEST_INTERVAL=0.2)
    publish(broker.url, {"n": 1}, {"n": 2, "drop": True}, {"n": 3, "retry_once": True}, {"n": 4})
    wait_for(lambda: sorted(done_bodies(tmp_path)) == [1, 3, 4], 20, message="the requeued message's second pass")
    assert [b["n"] for r in records(tmp_path) if r["kind"] == "dropped" for b in r["bodies"]] == [2]
    assert [b["n"] for r in records(tmp_path) if r["kind"] == "requeued" for b in r["bodies"]] == [3]
    wait_for(lambda: broker.queue_depth() == 0, 10, message="nothing left: acked, dropped or redelivered and acked")
    import requests
    stats = requests.get(srv.url + "/consumer", timeout=5).json()
    assert stats["failed"] == 0 and stats["requeued"] == 1 and stats["rejected"] == 1 and stats["handled"] == 5
    metrics = requests.get(srv.url + "/-/metrics", timeout=5).text
    assert 'greenqueue_consumer_messages_total{consumer="tests.apps.consumer_app.handle",outcome="handled"} 5' \
        in metrics, metrics


@pytest.mark.realproc
@pytest.mark.slow
def test_an_undecodable_body_reaches_the_handler_as_bytes(server_factory, broker, tmp_path):
    from kombu import Connection

    srv = consumer_server(server_factory, broker, tmp_path, GQ_TEST_BATCH=2, GQ_TEST_INTERVAL=0.2)
    with Connection(broker.url) as conn:
        conn.Producer().publish(b"\x00\xff", routing_key=QUEUE, content_type="application/x-custom",
                                content_encoding="binary")
    publish(broker.url, {"n": 1})
    wait_for(lambda: done_bodies(tmp_path) == [1], 15, message="the JSON message")
    assert [r["bodies"] for r in records(tmp_path) if r["kind"] == "raw"] == [["00ff"]]
    assert "not decoded (ContentDisallowed" in srv.log()
    wait_for(lambda: broker.queue_depth() == 0, 10)


@pytest.mark.realproc
@pytest.mark.slow
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
    # Start-up hooks ran before the first batch; shutdown hooks after the batch in hand finished.
    kinds = [r["kind"] for r in records(tmp_path)]
    assert kinds[0] == "startup" and kinds[-2:] == ["done", "shutdown"]


@pytest.mark.realproc
@pytest.mark.slow
def test_the_consumer_example_counts_its_own_page_views(server_factory, broker):
    import requests

    srv = server_factory("examples.consumer.app:app", env={"CONSUMER_AMQP_URL": broker.url, "CONSUMER_QUEUE": QUEUE})
    for _ in range(3):
        requests.get(srv.url + "/", timeout=5).raise_for_status()
    wait_for(lambda: requests.get(srv.url + "/stats", timeout=5).json()["views"] == {"/": 3}, 15,
             message="three views counted by the consumer")
    stats = requests.get(srv.url + "/stats", timeout=5).json()
    assert stats["handled"] == 3 and stats["failed"] == 0 and stats["batches"] >= 1


@pytest.mark.realproc
@pytest.mark.slow
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


# -- settlement and metrics events, without a broker -------------------------------------------------------------

class FakeRaw:
    """Stands in for a kombu message: records how it was settled."""

    def __init__(self):
        self.outcome = None

    def ack(self):
        self.outcome = "ack"

    def reject(self, requeue=False):
        self.outcome = "requeue" if requeue else "reject"


def batch_of(n):
    from greenqueue.consumers import Message
    raws = [FakeRaw() for _ in range(n)]
    return raws, [Message({"n": i}, id=i, raw=raw) for i, raw in enumerate(raws)]


def test_a_returning_handler_acks_what_it_did_not_settle_itself():
    from greenqueue.consumers import Consumer

    def handler(messages):
        messages[0].reject(requeue=False)
        messages[1].reject()
        messages[1].ack()  # a message is settled once; later calls are ignored

    seen = []
    unsubscribe = events.subscribe(seen.append, events.MessagesHandled, events.MessagesFailed)
    try:
        c = Consumer(handler, "amqp://localhost//", queues=["q"], batch_size=4, name="unit")
        raws, messages = batch_of(4)
        assert c.handle(messages) is True
    finally:
        unsubscribe()
    assert [r.outcome for r in raws] == ["reject", "requeue", "ack", "ack"]
    (e,) = seen
    assert type(e) is events.MessagesHandled and e.consumer.name == "unit"
    assert (e.count, e.requeued, e.rejected) == (4, 1, 1) and e.seconds >= 0
    assert (c.handled, c.failed, c.requeued, c.rejected) == (4, 0, 1, 1)


@pytest.mark.parametrize("on_error, outcome, requeued, rejected", [
    ("requeue", "requeue", 2, 1), ("reject", "reject", 0, 3), ("ack", "ack", 0, 1)])
def test_a_raising_handler_settles_the_rest_with_on_error(on_error, outcome, requeued, rejected):
    from greenqueue.consumers import Consumer

    def handler(messages):
        messages[0].reject(requeue=False)
        raise ValueError("boom")

    seen = []
    unsubscribe = events.subscribe(seen.append, events.MessagesFailed)
    try:
        c = Consumer(handler, "amqp://localhost//", queues=["q"], batch_size=3, on_error=on_error)
        raws, messages = batch_of(3)
        assert c.handle(messages) is False
    finally:
        unsubscribe()
    assert [r.outcome for r in raws] == ["reject", outcome, outcome]
    (e,) = seen
    assert (e.count, e.requeued, e.rejected, str(e.exception)) == (3, requeued, rejected, "boom")
    assert c.failed == 3 and c.handled == 0


def test_a_timeout_escaping_the_handler_fails_the_batch_not_the_consumer():
    from greenqueue.consumers import Consumer

    def handler(messages):
        gevent.Timeout.start_new(0.01)  # started and never cancelled: it fires inside the handler
        Event().wait(5)  # never set: only the timeout ends this wait

    c = Consumer(handler, "amqp://localhost//", queues=["q"], batch_size=2)
    raws, messages = batch_of(2)
    assert c.handle(messages) is False
    assert [r.outcome for r in raws] == ["requeue", "requeue"]
    assert c.failed == 2


def test_batches_never_outgrow_the_prefetch():
    from greenqueue.consumers import Consumer

    c = Consumer(lambda m: None, "amqp://localhost//", queues=["q"], batch_size=50, prefetch=10)
    assert c.batch_size == 10 and c.reader.prefetch == 10
    c = Consumer(lambda m: None, "amqp://localhost//", queues=["q"], batch_size=50)
    assert c.batch_size == 50 and c.reader.prefetch == 50


def test_consume_registers_and_reset_forgets():
    import greenqueue
    from greenqueue import ConfigError, consumers

    @greenqueue.consume("sse+http://127.0.0.1:9/events", batch_size=2, name="feed")
    def feed(messages):
        pass

    assert feed([]) is None  # still a plain function
    assert [c.name for c in consumers.consumers()] == ["feed"] and feed.consumer.batch_size == 2
    consumers.reset()
    assert consumers.consumers() == []
    with pytest.raises(ConfigError, match="on_error must be one of ack, reject, requeue"):
        greenqueue.consume("amqp://localhost//", queues=["q"], on_error="retry")(feed)


def test_sse_lines_make_messages():
    from greenqueue.consumers import parse_sse_line

    event = {"data": [], "id": None, "event": None}
    for line in ["id: 7", "event: tick", "data: {\"a\":", "data: 1}", ": comment"]:
        assert parse_sse_line(line, event) is None
    m = parse_sse_line("", event)
    assert (m.id, m.event, m.body) == ("7", "tick", {"a": 1})
    event = {"data": [], "id": None, "event": None}
    parse_sse_line("data:plain text", event)
    assert parse_sse_line("", event).body == "plain text"
    assert parse_sse_line("", {"data": [], "id": "8", "event": None}) is None  # no data: nothing to hand over


@pytest.mark.parametrize("on_error, read_again", [("requeue", True), ("reject", False)])
def test_a_failed_sse_batch_is_read_again_only_with_requeue(on_error, read_again):
    from greenqueue.consumers import Consumer, Message

    def handler(messages):
        raise RuntimeError("down")

    c = Consumer(handler, "sse+http://127.0.0.1:9/events", batch_size=2, on_error=on_error)
    c.reader.last_id = "4"
    batch = [Message(1, id="5"), Message(2, id="6")]
    assert c.reader.deliver(batch) is not read_again
    assert c.reader.last_id == ("4" if read_again else "6") and len(batch) == (2 if read_again else 0)


# -- batch tasks: per-item outcomes ----------------------------------------------------------------------------

def test_a_batch_task_can_give_each_item_its_own_outcome():
    calls = []

    @task(batch_size=3)
    def index(docs):
        calls.append(list(docs))
        return PerItem(d.upper() if d != "b" else ValueError("no title: %s" % d) for d in docs)

    a, b, c = (index.spawn(d) for d in "abc")
    assert a.get(WAIT) == "A" and c.get(WAIT) == "C"
    with pytest.raises(ValueError, match="no title: b"):
        b.get(WAIT)
    assert (a.state, b.state, c.state) == (SUCCESS, FAILURE, SUCCESS)
    assert calls == [["a", "b", "c"]]


def test_per_item_outcomes_must_match_the_batch():
    @task(batch_size=2)
    def index(docs):
        return PerItem([1])

    results = [index.spawn(d) for d in "ab"]
    for r in results:
        with pytest.raises(TypeError, match="1 outcomes for a batch of 2"):
            r.get(WAIT)


def test_an_item_cancelled_before_its_batch_runs_keeps_its_cancellation():
    @task(batch_size=2)
    def index(docs):
        return PerItem(docs)

    a, b = index.spawn("a"), index.spawn("b")
    b.cancel()  # flushed already (the batch is full) but not started yet
    assert a.get(WAIT) == "a" and b.state == CANCELLED
