"""HTTP strictness on the real server: what issue #18 found answered 200 or 500, answered as it should be."""

import socket

import pytest
import requests

from .test_server import raw_request

pytestmark = pytest.mark.realproc

APP = "tests.apps.basic:app"


@pytest.fixture
def server(server_factory):
    return server_factory(APP)


def status_line(data):
    return data.split(b"\r\n", 1)[0]


def test_http_2_0_request_line_is_answered_505(server):
    answer = raw_request(server.port, b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
    assert status_line(answer).startswith(b"HTTP/1.1 505 ")
    assert requests.get(server.url + "/", timeout=5).status_code == 200


def test_asterisk_form_with_get_is_answered_400(server):
    answer = raw_request(server.port, b"GET * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_line(answer).startswith(b"HTTP/1.1 400 ")


def test_asterisk_form_with_options_is_served(server):
    answer = raw_request(server.port, b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert status_line(answer) == b"HTTP/1.1 200 OK"


@pytest.mark.parametrize("head, partial", [
    (b"Content-Length: 100", b"x" * 40),
    (b"Transfer-Encoding: chunked", b"64\r\n" + b"x" * 40),
])
def test_a_client_hanging_up_mid_body_gets_a_400_and_one_log_line(server, head, partial):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\n" + head + b"\r\n\r\n" + partial)
        s.shutdown(socket.SHUT_WR)  # the client is done sending: its body ends short
        answer = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            answer += data
    assert status_line(answer).startswith(b"HTTP/1.1 400 ")
    assert requests.get(server.url + "/", timeout=5).text == "Hello, greenqueue!"
    log = server.log()
    assert log.count("into a request body") == 1
    assert "Traceback" not in log and "EOFError" not in log


def test_pipelined_requests_with_bodies_are_answered_in_order(server):
    data = raw_request(server.port,
                       b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\none"
                       b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n"
                       b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.index(b"one") < data.index(b"two") < data.index(b"Hello, greenqueue!")


def test_many_requests_on_one_keep_alive_connection_are_answered_one_by_one(server):
    with requests.Session() as session:
        texts = [session.get(server.url + "/env", params={"i": str(i)}, timeout=5).json()["query"]
                 for i in range(50)]
    assert texts == ["i=%d" % i for i in range(50)]
