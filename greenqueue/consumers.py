"""Consumers: ``@consume(source)`` handlers fed from RabbitMQ queues or a remote SSE stream, in batches.

Concurrency model: each consumer runs in its own greenlet in the server
process. It reads from its source (kombu/py-amqp sockets, or an HTTP
stream; both cooperative under the server's monkey-patching), collects
messages until ``batch_size`` are waiting or ``batch_interval`` seconds have
passed since the first, and calls the handler with the list, in that same
greenlet, so at most one batch per consumer is in flight and a slow handler
holds back delivery (RabbitMQ's prefetch is bounded by the batch size). A
lost connection is retried with backoff, each attempt logged. ``stop()``
stops reading, finishes the batch in hand and closes; with RabbitMQ, what was
delivered but not acknowledged goes back to the queue.

A RabbitMQ connection negotiates AMQP heartbeats and sets TCP keepalive: the
reader checks the heartbeat between batches and a helper greenlet keeps
sending heartbeats while a handler runs, so a silently dropped connection is
noticed (and reconnected) within about two heartbeat intervals instead of
stalling the consumer forever. A message sent back to its queue is republished
with its delivery count in a header; past ``max_deliveries`` it goes to the
durable queue ``<queue>.dead`` with its last traceback, instead of looping.

Handlers always get a list (as asyncworker's do, even for batch_size=1) of
:class:`Message`; a handler may ``ack()``/``reject()`` single messages;
the rest are settled by ``on_success`` when it returns and by ``on_error``
when it raises.
"""

import json
import logging
import os
import socket
import time
import traceback
import uuid
from contextlib import contextmanager
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar,
                    Union, cast)
from urllib.parse import urlsplit, urlunsplit

import gevent

from . import events
from .errors import ConfigError

if TYPE_CHECKING:
    import http.client

    from amqp import Channel as _AMQPChannel  # type: ignore[import-untyped]
    from amqp import Connection as _AMQPConnection
    from gevent.queue import Queue
    from kombu import Connection
    from kombu.message import Message as _RawMessage

log = logging.getLogger(__name__)

__all__ = ["consume", "publish", "Message", "Consumer", "start_all", "stop_all", "reset", "consumers",
           "parse_sse_line"]

SETTLE = ("ack", "reject", "requeue")
_EOF = object()
_BACKOFF_MAX = 10.0

#: Header names greenqueue writes on RabbitMQ messages it sends back or dead-letters.
DELIVERIES_HEADER = "x-greenqueue-deliveries"  # deliveries so far, carried by the republished copy
TRACEBACK_HEADER = "x-greenqueue-traceback"
EXCEPTION_HEADER = "x-greenqueue-exception"
QUEUE_HEADER = "x-greenqueue-queue"  # the queue a dead letter came from
#: RabbitMQ's own count of earlier deliveries (quorum queues only).
BROKER_COUNT_HEADER = "x-delivery-count"
DEAD_SUFFIX = ".dead"

#: Defaults: seconds between heartbeats, and TCP keepalive (idle seconds, probe interval, probe count).
HEARTBEAT = 30.0
KEEPALIVE = (60, 10, 6)
MAX_DELIVERIES = 5
# Checks per heartbeat interval, as Celery's broker_heartbeat_checkrate: a beat is
# sent when nothing else went out for heartbeat/2 seconds.
_HEARTBEAT_RATE = 2
_TRACEBACK_MAX = 8000  # characters kept (the end): a header must fit in one AMQP frame
_CONFIRM_TIMEOUT = 10.0

#: A handler takes the batch; what it returns is ignored.
_Handler = TypeVar("_Handler", bound=Callable[[List["Message"]], object])


class Message:
    """One message for a handler: ``body``, ``id``, ``headers``, ``deliveries``, ``ack()``, ``reject(requeue)``."""

    __slots__ = ("body", "id", "event", "headers", "deliveries", "settled", "_raw", "_redeliver")

    def __init__(self, body: Any, id: Union[int, str, None] = None, event: Optional[str] = None,
                 headers: Optional[Dict[str, Any]] = None, raw: Optional["_RawMessage"] = None,
                 deliveries: int = 1,
                 redeliver: Optional[Callable[["Message", Optional[BaseException]], str]] = None) -> None:
        self.body = body
        self.id = id  # RabbitMQ's delivery tag (an int), or an SSE event's id
        self.event = event
        self.headers = headers or {}
        self.deliveries = deliveries  # this delivery's number, 1 the first time
        self.settled: Optional[str] = None  # "ack", "reject", "requeue", or "dead" (sent to <queue>.dead)
        self._raw = raw
        self._redeliver = redeliver

    def ack(self) -> None:
        """Confirm the message (RabbitMQ removes it from the queue)."""
        self._settle("ack")

    def reject(self, requeue: bool = True) -> None:
        """Refuse the message; with ``requeue`` it is delivered again."""
        self._settle("requeue" if requeue else "reject")

    def _settle(self, how: str, error: Optional[BaseException] = None) -> None:
        if self.settled is not None:
            return
        self.settled = how
        raw = self._raw
        if raw is None:
            return
        if how == "ack":
            raw.ack()
        elif how == "requeue" and self._redeliver is not None:
            self.settled = self._redeliver(self, error)
        else:
            raw.reject(requeue=(how == "requeue"))

    def __repr__(self) -> str:
        return "<Message %s %r>" % (self.id, self.body)


class Consumer:
    """One ``@consume`` handler, its source and its batching."""

    def __init__(self, fn: Callable[[List[Message]], object], source: str, queues: Optional[Sequence[str]] = None,
                 batch_size: int = 1, batch_interval: Optional[float] = None, on_success: str = "ack",
                 on_error: str = "requeue", prefetch: Optional[int] = None, name: Optional[str] = None,
                 heartbeat: Optional[float] = HEARTBEAT, keepalive: Optional[Tuple[int, int, int]] = KEEPALIVE,
                 max_deliveries: Optional[int] = MAX_DELIVERIES) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("batch_size must be an integer >= 1, got %r" % (batch_size,))
        if batch_interval is not None and batch_interval <= 0:
            raise ConfigError("batch_interval must be > 0 seconds or None, got %r" % (batch_interval,))
        for label, value in (("on_success", on_success), ("on_error", on_error)):
            if value not in SETTLE:
                raise ConfigError("%s must be one of %s, got %r" % (label, ", ".join(SETTLE), value))
        if heartbeat is not None and (not isinstance(heartbeat, (int, float)) or heartbeat < 0):
            raise ConfigError("heartbeat must be seconds >= 0 (0 or None: off), got %r" % (heartbeat,))
        if keepalive is not None and (not isinstance(keepalive, (tuple, list)) or len(keepalive) != 3
                                      or not all(isinstance(v, int) and v >= 1 for v in keepalive)):
            raise ConfigError("keepalive must be (idle seconds, probe interval seconds, probe count), all integers "
                              ">= 1, or None for py-amqp's own; got %r" % (keepalive,))
        if max_deliveries is not None and (not isinstance(max_deliveries, int) or max_deliveries < 1):
            raise ConfigError("max_deliveries must be an integer >= 1, or None to requeue forever; got %r"
                              % (max_deliveries,))
        scheme = urlsplit(source).scheme
        if scheme in ("amqp", "amqps"):
            if not queues:
                raise ConfigError("consume(%r): name the queues to read, e.g. queues=['events']" % source)
            if prefetch is not None and prefetch < batch_size:
                # asyncworker's rule: a batch larger than the prefetch could never fill.
                log.warning("consume(%s): batch_size %d is above prefetch %d; batches hold at most %d",
                            _safe_url(source), batch_size, prefetch, prefetch)
                batch_size = prefetch
            self.reader: Union[_AMQPReader, _SSEReader] = _AMQPReader(self, source, list(queues),
                                                                      prefetch or batch_size)
        elif scheme in ("sse+http", "sse+https"):
            self.reader = _SSEReader(self, source)
        else:
            raise ConfigError("consume(%r): unknown source; use amqp://... or sse+http://..." % source)
        self.fn = fn
        self.name = name or "%s.%s" % (fn.__module__, fn.__qualname__)
        self.source = source
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        self.on_success = on_success
        self.on_error = on_error
        self.heartbeat = heartbeat or 0
        self.keepalive = tuple(keepalive) if keepalive is not None else None
        self.max_deliveries = max_deliveries
        self.running = False
        self.greenlet: Optional["gevent.Greenlet[[], None]"] = None
        self.handled = self.failed = self.requeued = self.rejected = 0
        self.dead_lettered = 0  # also counted in ``rejected``: they left the queue for good

    def start(self) -> "Consumer":
        """Start reading in a greenlet."""
        if self.greenlet is None or self.greenlet.dead:
            self.running = True
            self.greenlet = gevent.spawn(self.reader.run)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop reading, finish the batch in hand, close the connection."""
        self.running = False
        if self.greenlet is not None:
            self.greenlet.join(timeout)
            if not self.greenlet.dead:
                log.warning("consumer %s did not stop within %.1fs; killing it", self.name, timeout)
                self.greenlet.kill(block=True, timeout=2)

    def due(self, batch: Sequence[Message], first_at: float) -> bool:
        """True when ``batch`` should go to the handler now."""
        if not batch:
            return False
        if len(batch) >= self.batch_size or not self.running:
            return True
        return self.batch_interval is not None and time.monotonic() - first_at >= self.batch_interval

    def wait_time(self, batch: Sequence[Message], first_at: float) -> float:
        """How long the reader may block before the batch is due (None: until a message comes)."""
        if batch and self.batch_interval is not None:
            return max(0.0, self.batch_interval - (time.monotonic() - first_at))
        return 1.0  # wake now and then to notice stop()

    def handle(self, batch: List[Message]) -> bool:
        """Call the handler with ``batch`` and settle what it left unsettled; True if it succeeded."""
        started = time.monotonic()
        try:
            self.fn(batch)
        except (Exception, gevent.Timeout) as exc:
            # A gevent.Timeout escaping the handler is its failure too, not the reader's end.
            seconds = time.monotonic() - started
            left = [m for m in batch if m.settled is None]
            for m in left:
                m._settle(self.on_error, exc)
            self.failed += len(batch)
            requeued, rejected = _count(batch, "requeue"), _count(batch, "reject", "dead")
            self.requeued += requeued
            self.rejected += rejected
            dead = _count(left, "dead")
            outcomes = ["%d message(s) %s" % (len(left) - dead, {"requeue": "requeued", "reject": "rejected",
                                                                  "ack": "acknowledged"}[self.on_error])]
            if dead:
                outcomes = outcomes[:1 if len(left) > dead else 0] + ["%d sent to the dead-letter queue" % dead]
            log.warning("consumer %s: batch of %d failed (%s: %s); %s", self.name, len(batch), type(exc).__name__,
                        exc, ", ".join(outcomes))
            events.notify(events.MessagesFailed(self, count=len(batch), seconds=seconds, exception=exc,
                                                requeued=requeued, rejected=rejected))
            return False
        seconds = time.monotonic() - started
        for m in batch:
            if m.settled is None:
                m._settle(self.on_success)
        requeued, rejected = _count(batch, "requeue"), _count(batch, "reject", "dead")
        self.handled += len(batch)
        self.requeued += requeued
        self.rejected += rejected
        events.notify(events.MessagesHandled(self, count=len(batch), seconds=seconds, requeued=requeued,
                                             rejected=rejected))
        return True


def _count(batch: Iterable[Message], *how: str) -> int:
    return sum(1 for m in batch if m.settled in how)


class _AMQPReader:
    """RabbitMQ through kombu: QoS bounded by the batch, heartbeats, counted redelivery, reconnect with backoff."""

    def __init__(self, consumer: Consumer, url: str, queues: List[str], prefetch: int) -> None:
        self.consumer = consumer
        self.url = url
        self.queues = queues
        self.prefetch = prefetch
        self.connected = False  # set once a session is consuming; a later failure restarts the backoff
        self.connection: Optional["Connection"] = None  # the live session's connection (for inspection)
        self.publisher: Optional["_AMQPChannel"] = None  # the session's channel for republishing, in confirm mode

    def run(self) -> None:
        c = self.consumer
        attempt = 0
        while c.running:
            self.connected = False
            try:
                self._session()
                return
            except Exception as exc:
                if not c.running:
                    return
                attempt = 1 if self.connected else attempt + 1
                delay = min(_BACKOFF_MAX, 0.5 * 2 ** (attempt - 1))
                log.warning("consumer %s: broker %s unreachable (%s: %s); reconnect attempt %d in %.1fs",
                            c.name, _safe_url(self.url), type(exc).__name__, exc, attempt, delay)
                _sleep_while(c, delay)

    def transport_options(self) -> Dict[str, Any]:
        """kombu transport options for py-amqp: the TCP keepalive settings, if any."""
        keepalive = self.consumer.keepalive
        if keepalive is None:
            return {}
        names = ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")
        # py-amqp sets SO_KEEPALIVE itself; these tune when a dead peer is given up on.
        return {"socket_settings": {getattr(socket, n): v for n, v in zip(names, keepalive) if hasattr(socket, n)}}

    def _session(self) -> None:
        from kombu import Connection, Queue
        from kombu import Consumer as KombuConsumer

        c = self.consumer
        batch: List[Message] = []
        first_at = 0.0

        def receiver(queue: str) -> Tuple[Callable[[Any, "_RawMessage"], None],
                                          Callable[["_RawMessage", Exception], None]]:
            def on_message(body: Any, raw: "_RawMessage") -> None:
                nonlocal first_at
                if not batch:
                    first_at = time.monotonic()
                batch.append(self._message(queue, body, raw))

            def on_undecodable(raw: "_RawMessage", exc: Exception) -> None:
                # A body kombu cannot decode (unknown content type, bad JSON) reaches the
                # handler as bytes rather than failing the connection forever.
                log.warning("consumer %s: message %s not decoded (%s: %s); handing over its raw bytes",
                            c.name, raw.delivery_tag, type(exc).__name__, exc)
                on_message(raw.body, raw)
            return on_message, on_undecodable

        conn = Connection(self.url, connect_timeout=5, heartbeat=c.heartbeat,
                          transport_options=self.transport_options())
        finished = False
        kombu_consumers = []
        try:
            conn.ensure_connection(max_retries=1)
            channel = conn.channel()
            channel.basic_qos(0, self.prefetch, False)
            if c.max_deliveries is not None:
                publisher = conn.channel()  # basic_publish_confirm puts it in confirm mode on first use
                for q in self.queues:
                    Queue(q + DEAD_SUFFIX, durable=True, channel=publisher).declare()
                self.publisher = publisher
            for q in self.queues:
                on_message, on_undecodable = receiver(q)
                # One kombu consumer per queue, so each message knows the queue to go back to.
                kc = KombuConsumer(channel, [Queue(q, durable=True, channel=channel)], callbacks=[on_message],
                                   on_decode_error=on_undecodable,
                                   accept=["json", "text/plain", "application/octet-stream"])
                kc.consume()
                kombu_consumers.append(kc)
            self.connection = conn
            self.connected = True
            beat = float(conn.get_heartbeat_interval() or 0)  # negotiated with the broker; 0: off
            log.info("consumer %s: reading %s from %s (prefetch %d, heartbeat %s, max deliveries %s)", c.name,
                     ", ".join(self.queues), _safe_url(self.url), self.prefetch,
                     "%gs" % beat if beat else "off", c.max_deliveries or "unlimited")
            tick_every = beat / _HEARTBEAT_RATE
            next_tick = time.monotonic() + tick_every
            while c.running or batch:
                if c.due(batch, first_at):
                    current, batch[:] = list(batch), []
                    with _beating(conn.connection, tick_every):
                        c.handle(current)
                    continue
                if not c.running:
                    break
                wait = c.wait_time(batch, first_at)
                if beat:
                    wait = min(wait, next_tick - time.monotonic())
                try:
                    conn.drain_events(timeout=max(wait, 0.001))
                except socket.timeout:
                    pass  # no message within the wait: check heartbeats, the batch timer and stop()
                if beat and time.monotonic() >= next_tick:
                    # After a drain, so what the broker sent during a long handler counts as heard.
                    _heartbeat_check(conn, beat)
                    next_tick = time.monotonic() + tick_every
            finished = True
        finally:
            self.connection = None
            self.publisher = None
            if finished:
                for kc in kombu_consumers:
                    try:
                        kc.cancel()
                    except Exception:
                        pass  # the connection may already be gone; unacked messages return to the queue anyway
                conn.release()
            else:
                # No goodbye handshake: on a silently dropped connection it would wait forever.
                conn.collect()

    def _message(self, queue: str, body: Any, raw: "_RawMessage") -> Message:
        headers = raw.headers or {}
        before = _int_header(headers, DELIVERIES_HEADER) + _int_header(headers, BROKER_COUNT_HEADER)
        redeliver = None
        if self.consumer.max_deliveries is not None:
            def redeliver(m: Message, error: Optional[BaseException]) -> str:
                return self.redeliver(queue, m, error)
        return Message(body, id=raw.delivery_tag, headers=headers, raw=raw, deliveries=before + 1,
                       redeliver=redeliver)

    def redeliver(self, queue: str, m: Message, error: Optional[BaseException]) -> str:
        """Send ``m`` back to ``queue`` with its delivery count, or past max_deliveries to ``<queue>.dead``."""
        import amqp

        c = self.consumer
        raw = cast("_RawMessage", m._raw)
        publisher = self.publisher
        if publisher is None:
            raise ConnectionError("consumer %s: no publishing channel to send message %s back" % (c.name, m.id))
        props = dict(raw.properties)
        headers = dict(props.get("application_headers") or {})
        headers.pop(BROKER_COUNT_HEADER, None)  # the copy starts the broker's count afresh; ours carries the total
        headers[DELIVERIES_HEADER] = m.deliveries
        if not props.get("message_id"):
            props["message_id"] = uuid.uuid4().hex  # so the log line and the dead letter name the same message
        dead = c.max_deliveries is not None and m.deliveries >= c.max_deliveries
        target = queue
        if dead:
            target = queue + DEAD_SUFFIX
            props["delivery_mode"] = 2
            headers[QUEUE_HEADER] = queue
            if error is not None:
                headers[EXCEPTION_HEADER] = type(error).__name__
                text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            else:
                headers[EXCEPTION_HEADER] = ""
                text = "(no exception: the handler sent it back with reject(requeue=True))"
            headers[TRACEBACK_HEADER] = text[-_TRACEBACK_MAX:]
        props["application_headers"] = headers
        # The copy is confirmed by the broker before the original is acknowledged: at worst
        # a crash in between leaves both, a duplicate, never neither.
        publisher.basic_publish_confirm(amqp.Message(raw.body, **props), exchange="", routing_key=target,
                                        confirm_timeout=_CONFIRM_TIMEOUT)
        raw.ack()
        if not dead:
            return "requeue"
        c.dead_lettered += 1
        log.error("consumer %s: message %s dead-lettered to %s after %d deliveries (last error: %s); its traceback "
                  "is in header %s. Fix the cause, then move it back to %s (e.g. with a shovel) or delete it",
                  c.name, props["message_id"], target, m.deliveries,
                  "%s: %s" % (type(error).__name__, error) if error is not None else "requeued by the handler",
                  TRACEBACK_HEADER, queue)
        return "dead"


def _int_header(headers: Dict[str, Any], name: str) -> int:
    try:
        return max(0, int(headers.get(name) or 0))
    except (TypeError, ValueError):
        return 0  # a header someone else wrote, not a count


def _heartbeat_check(conn: "Connection", beat: float) -> None:
    """Send a heartbeat if due; raise ConnectionError when the broker has been silent for two intervals."""
    from amqp.exceptions import ConnectionForced  # type: ignore[import-untyped]

    try:
        conn.heartbeat_check(rate=_HEARTBEAT_RATE)
    except ConnectionForced as exc:
        raise ConnectionError("nothing from the broker for over %gs, not even a heartbeat (%s); the connection is "
                              "presumed dropped" % (2 * beat, exc)) from exc


@contextmanager
def _beating(connection: "_AMQPConnection", every: float) -> Iterator[None]:
    """Keep sending heartbeats every ``every`` seconds while the block (a handler) runs, so the broker keeps us."""
    if not every:
        yield
        return

    def beat() -> None:
        # Frames of 8 bytes, written whole; Celery's green pools do the same from a timer.
        while True:
            gevent.sleep(every)
            try:
                connection.send_heartbeat()
            except Exception:
                return  # the reader finds out after the handler, and reconnects

    helper = gevent.spawn(beat)
    try:
        yield
    finally:
        helper.kill(block=False)


class _SSEReader:
    """A remote event stream: reconnects with Last-Event-ID; a failed batch is read again from its start."""

    def __init__(self, consumer: Consumer, url: str) -> None:
        self.consumer = consumer
        parts = urlsplit(url)
        self.url = urlunsplit((parts.scheme.split("+", 1)[1],) + tuple(parts[1:]))
        self.last_id: Optional[str] = None  # the id of the last event of the last handled batch

    def run(self) -> None:
        c = self.consumer
        attempt = 0
        while c.running:
            try:
                if self._session():
                    attempt = 0
            except Exception as exc:
                if not c.running:
                    return
                attempt += 1
                log.warning("consumer %s: stream %s failed (%s: %s); reconnect attempt %d", c.name, self.url,
                            type(exc).__name__, exc, attempt)
            if c.running:
                _sleep_while(c, min(_BACKOFF_MAX, 0.2 * 2 ** max(0, attempt - 1)))

    def _session(self) -> bool:
        """Read one connection's worth of events; returns True if the stream ended normally."""
        import http.client

        from gevent.queue import Empty, Queue

        c = self.consumer
        parts = urlsplit(self.url)
        if parts.hostname is None:
            # Failing here takes the same path as any refused connection: logged, then retried.
            raise ConnectionError("no host in %s" % self.url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname, parts.port, timeout=60)
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = self.last_id
        path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            conn.close()
            raise ConnectionError("HTTP %d from %s" % (resp.status, self.url))
        # A reader greenlet owns the socket (a read timeout would spoil the buffered
        # file); this greenlet waits on its queue, so it can honour batch_interval.
        lines: "Queue[Any]" = Queue()  # str lines, then _EOF or the exception that ended them
        reader = gevent.spawn(_read_lines, resp, lines)
        batch: List[Message] = []
        first_at = 0.0
        event: Dict[str, Any] = {"data": [], "id": None, "event": None}
        try:
            while c.running:
                try:
                    line = lines.get(timeout=c.wait_time(batch, first_at))
                except Empty:
                    line = None
                if isinstance(line, BaseException):
                    raise line
                if line is _EOF:
                    break  # the server ended the stream: deliver what we have, then reconnect
                if line is not None:
                    msg = parse_sse_line(line, event)
                    if msg is not None:
                        if not batch:
                            first_at = time.monotonic()
                        batch.append(msg)
                        event = {"data": [], "id": None, "event": None}
                if c.due(batch, first_at) and not self.deliver(batch):
                    return False  # on_error="requeue": read the failed batch again from the last good event
            if batch:
                self.deliver(batch)
        finally:
            reader.kill(block=False)
            conn.close()
        return True

    def deliver(self, batch: List[Message]) -> bool:
        """Handle ``batch``; False if it failed and must be read again (on_error="requeue")."""
        if not self.consumer.handle(list(batch)) and self.consumer.on_error == "requeue":
            return False
        ids = [m.id for m in batch if m.id is not None]  # "reject"/"ack" on error: move past the batch
        if ids:
            self.last_id = cast(str, ids[-1])  # parse_sse_line made these messages: their ids are str
        batch.clear()
        return True


def _read_lines(resp: "http.client.HTTPResponse", queue: "Queue[Any]") -> None:
    """Put each line of the HTTP body on ``queue`` (then _EOF, or the error)."""
    try:
        while True:
            raw = resp.readline()  # HTTPResponse.readline undoes chunked framing
            if not raw:
                queue.put(_EOF)
                return
            queue.put(raw.decode("utf-8").rstrip("\r\n"))
    except Exception as exc:
        queue.put(exc)


def parse_sse_line(line: str, event: Dict[str, Any]) -> Optional[Message]:
    """Feed one SSE line into ``event`` (``{"data": [], "id": None, "event": None}``); a blank line returns the Message."""
    if line == "":
        if not event["data"]:
            return None
        data = "\n".join(event["data"])
        try:
            body = json.loads(data)
        except ValueError:
            body = data
        return Message(body, id=event["id"], event=event["event"])
    if line.startswith(":"):
        return None
    field, _, value = line.partition(":")
    value = value[1:] if value.startswith(" ") else value
    if field == "data":
        event["data"].append(value)
    elif field == "id":
        event["id"] = value
    elif field == "event":
        event["event"] = value
    return None


def _sleep_while(consumer: Consumer, seconds: float) -> None:
    end = time.monotonic() + seconds
    while consumer.running and time.monotonic() < end:
        gevent.sleep(min(0.1, end - time.monotonic()))


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


_consumers: List[Consumer] = []


def consume(source: str, queues: Optional[List[str]] = None, batch_size: int = 1,
            batch_interval: Optional[float] = None, on_success: str = "ack", on_error: str = "requeue",
            prefetch: Optional[int] = None, name: Optional[str] = None, heartbeat: Optional[float] = HEARTBEAT,
            keepalive: Optional[Tuple[int, int, int]] = KEEPALIVE,
            max_deliveries: Optional[int] = MAX_DELIVERIES) -> Callable[[_Handler], _Handler]:
    """Register the decorated ``handler(messages)`` to consume ``source`` (amqp://... or sse+http://...).

    RabbitMQ only: ``heartbeat`` seconds (0 or None: off), TCP ``keepalive`` as
    (idle, interval, count) (None: py-amqp's), and ``max_deliveries`` before
    a message goes to ``<queue>.dead`` (None: requeue forever).
    """
    def decorate(fn: _Handler) -> _Handler:
        c = Consumer(fn, source, queues, batch_size, batch_interval, on_success, on_error, prefetch, name,
                     heartbeat=heartbeat, keepalive=keepalive, max_deliveries=max_deliveries)
        _consumers.append(c)
        # The handler stays the user's own function; its type declares no ``consumer`` attribute.
        setattr(fn, "consumer", c)
        return fn
    return decorate


def consumers() -> List["Consumer"]:
    """The registered consumers."""
    return list(_consumers)


def start_all() -> List["Consumer"]:
    """Start every registered consumer (the server calls this after start-up hooks)."""
    for c in _consumers:
        c.start()
    return list(_consumers)


def stop_all(timeout: float = 10.0) -> None:
    """Stop every consumer, letting in-flight batches finish within ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    for c in _consumers:
        c.running = False  # all stop reading at once; then each finishes its batch
    for c in _consumers:
        c.stop(max(0.1, deadline - time.monotonic()))


def reset() -> None:
    """Stop and forget every consumer and pooled publishing connection (tests)."""
    stop_all(2)
    _consumers.clear()
    _close_publishers()


def publish(url: str, queue: str, body: Any, headers: Optional[Dict[str, Any]] = None) -> None:
    """Publish ``body`` (JSON-serialisable) to ``queue`` on the broker at ``url`` (declared durable).

    Connections are pooled per process and broker URL (kombu's producer pool),
    so a view can publish on every request without a new AMQP handshake each
    time; a lost connection is re-established (up to 3 retries).
    """
    from kombu import Queue, pools

    with pools.producers[_connection(url)].acquire(block=True, timeout=10) as producer:
        producer.publish(body, routing_key=queue, declare=[Queue(queue, durable=True)], serializer="json",
                         delivery_mode=2, headers=headers or {}, retry=True, retry_policy={"max_retries": 3})


# (pid, url) -> kombu Connection: the key of kombu's per-connection producer pool
_connections: Dict[Tuple[int, str], "Connection"] = {}


def _connection(url: str) -> "Connection":
    from kombu import Connection

    key = (os.getpid(), url)  # never reuse a parent's sockets after fork
    conn = _connections.get(key)
    if conn is None:
        conn = _connections[key] = Connection(url, connect_timeout=5)
    return conn


def _close_publishers() -> None:
    if _connections:
        from kombu import pools
        pools.reset()  # closes every pooled connection and producer
        _connections.clear()
