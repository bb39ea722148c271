"""The connection model: idle connections hold no greenlet, runners serve ready ones back to back.

Apps see what a thread-pool server gives them: Flask's ``g`` and request state
never leak, a context variable set and never reset does not reach the next
request, a thread local persists per runner; a blocked request never holds
up the others.
"""

import socket
import threading
import time

import pytest
import requests

from .conftest import wait_for

pytestmark = [pytest.mark.realproc]

APP = "tests.apps.runner_app:app"


def test_nothing_leaks_from_one_request_to_the_next(server_factory):
    srv = server_factory(APP)
    seen = []
    with requests.Session() as a, requests.Session() as b:
        for i in range(20):
            for client, name in ((a, "a"), (b, "b")):
                seen.append(client.get(srv.url + "/leak", params={"m": "%s%d" % (name, i)}, timeout=5).json())
    assert all(s["g"] is None for s in seen), seen
    assert all(s["contextvar"] is None for s in seen), seen
    # A thread local persists per runner (as per thread in a thread pool): with nothing blocking,
    # one runner serves both clients, and each request sees the previous request's marker.
    locals_seen = [s["local"] for s in seen[1:]]
    assert locals_seen == [s["arg"] for s in seen[:-1]]


def test_a_blocked_request_holds_up_no_other_connection(server_factory):
    srv = server_factory(APP)
    blocked = threading.Thread(target=requests.get, args=(srv.url + "/block?s=3",), kwargs={"timeout": 10})
    blocked.start()
    wait_for(lambda: requests.get(srv.url + "/blocking", timeout=5).text == "1", 5, message="a request blocked")
    started = time.monotonic()
    with requests.Session() as s:
        for _ in range(50):
            assert s.get(srv.url + "/hello", timeout=5).text == "hello"
    assert time.monotonic() - started < 2.5
    blocked.join(10)


def test_many_idle_connections_are_each_still_served(server_factory):
    srv = server_factory(APP, "--max-connections", "3000")
    conns = []
    try:
        for _ in range(1500):
            conns.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
        wait_for(lambda: requests.get(srv.url + "/hello", timeout=5).text == "hello", 10, message="served")
        # Every idle connection answers when it finally asks, in any order.
        for c in reversed(conns):
            c.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        for c in conns:
            data = b""
            while not data.endswith(b"hello"):
                chunk = c.recv(4096)
                assert chunk, data
                data += chunk
    finally:
        for c in conns:
            c.close()


def test_idle_keepalive_timeout_still_closes_quietly(server_factory):
    srv = server_factory(APP, "--keepalive-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as c:
        c.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b"hello"):
            data += c.recv(4096)
        started = time.monotonic()
        assert c.recv(4096) == b""  # closed by the server after the keep-alive timeout
        assert 0.3 < time.monotonic() - started < 3
