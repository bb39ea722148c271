"""The real server as a subprocess, driven over real sockets."""

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from .conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.realproc

APP = "tests.apps.basic:app"


def raw_request(port, data, timeout=5.0, family=socket.AF_INET, address=None):
    """Send raw bytes, read until the server closes (or the timeout); return what came back."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address or ("127.0.0.1", port))
        s.sendall(data)
        chunks = []
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except socket.timeout:
            chunks.append(b"<timeout>")
        return b"".join(chunks)


@pytest.fixture
def server(server_factory):
    return server_factory(APP)


def test_hello_world(server):
    r = requests.get(server.url + "/")
    assert r.status_code == 200
    assert r.text == "Hello, greenqueue!"
    assert r.headers["Content-Length"] == "18"


def test_keep_alive_reuses_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/")
    first = conn.getresponse()
    assert first.read() == b"Hello, greenqueue!"
    sock = conn.sock
    for _ in range(5):
        conn.request("GET", "/count/3")
        resp = conn.getresponse()
        assert resp.read() == b"0\n1\n2\n"
        assert resp.getheader("Transfer-Encoding") == "chunked"
    assert conn.sock is sock, "the connection was not kept alive"
    conn.close()


def test_pipelined_requests_are_answered_in_order(server):
    req = b"GET /env?n=%d HTTP/1.1\r\nHost: x\r\n\r\n"
    data = raw_request(server.port, req % 1 + req % 2 + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.index(b'"n=1"') < data.index(b'"n=2"') < data.index(b"Hello, greenqueue!")


def test_first_stream_chunk_arrives_before_the_generator_ends(server):
    with requests.get(server.url + "/stream", stream=True, timeout=10) as r:
        lines = r.iter_lines()
        # /stream blocks until /release; this read only returns if "first" was flushed.
        assert next(lines) == b"first"
        assert requests.get(server.url + "/release", timeout=5).text == "released"
        assert next(lines) == b"last"


def test_a_burst_of_chunks_is_all_delivered_while_the_generator_waits(server):
    # Chunks made back to back may share packets, but none may be held once the generator waits.
    with requests.Session() as session:
        with session.get(server.url + "/burst/500", stream=True, timeout=10) as r:
            lines = r.iter_lines(chunk_size=1)
            assert [next(lines) for _ in range(500)] == [b"%d" % i for i in range(500)]
            assert session.get(server.url + "/release", timeout=5).text == "released"  # another connection
            assert next(lines) == b"last"
        # The same kept-alive connection then streams a lone chunk at once.
        with session.get(server.url + "/stream", stream=True, timeout=10) as r:
            assert next(r.iter_lines()) == b"first"
            assert requests.get(server.url + "/release", timeout=5).text == "released"


def test_client_leaving_an_idle_stream_closes_its_generator_at_once(server):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"first" in s.recv(1000)
    assert requests.get(server.url + "/stream-closed").text == "no"
    s.close()  # the generator is blocked (no write will come) until /release
    started = time.monotonic()
    assert requests.get(server.url + "/stream-closed", params={"wait": "5"}).text == "yes"
    assert time.monotonic() - started < 1.0


def test_head_and_204_have_no_body(server):
    data = raw_request(server.port, b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 18" in head and body == b""
    data = raw_request(server.port, b"GET /nocontent HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 204") and data.endswith(b"\r\n\r\n")


def test_request_bodies_fixed_chunked_and_expect_continue(server):
    assert requests.post(server.url + "/echo", data=b"x" * 100000).content == b"x" * 100000
    assert requests.post(server.url + "/echo", data=iter([b"ab", b"cd"])).content == b"abcd"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b"hello")
        assert s.recv(1000).endswith(b"hello")


def test_app_error_is_a_500_and_the_server_keeps_serving(server):
    r = requests.get(server.url + "/boom")
    assert r.status_code == 500
    assert requests.get(server.url + "/").status_code == 200
    assert "RuntimeError: boom" in server.log()


def test_a_timeout_escaping_a_view_is_a_500_too(server):
    # gevent.Timeout is a BaseException: it must not slip past the error handling.
    r = requests.get(server.url + "/timeout-escapes", timeout=5)
    assert r.status_code == 500
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        # Too late for a 500 mid-stream: the body is cut, so the client knows it is incomplete.
        requests.get(server.url + "/timeout-escapes-mid-stream", timeout=5).content
    assert requests.get(server.url + "/").status_code == 200
    assert server.log().count("Timeout") >= 2


def test_sigterm_lets_an_in_flight_request_finish(server_factory, tmp_path):
    srv = server_factory(APP)
    marker = tmp_path / "in-flight"
    result = {}

    def client():
        r = requests.get(srv.url + "/slow", params={"seconds": "1.5", "marker": str(marker)}, timeout=20)
        result["status"], result["text"] = r.status_code, r.text

    t = threading.Thread(target=client)
    t.start()
    wait_for(marker.exists, 10, message="the slow request to start")
    srv.send_signal(signal.SIGTERM)
    t.join(20)
    assert result == {"status": 200, "text": "slow done"}
    assert srv.proc.wait(20) == 0
    log = srv.log()
    assert "stopped accepting" in log and "shutdown complete" in log


def test_a_task_spawned_by_a_view_finishes_and_can_be_looked_up(server, tmp_path):
    path = str(tmp_path / "out")
    spawned = requests.post(server.url + "/spawn", data={"path": path}).json()
    assert spawned["state"] in ("PENDING", "STARTED")
    state = wait_for(lambda: requests.get(server.url + "/task/" + spawned["id"]).json()["state"] == "SUCCESS"
                     and requests.get(server.url + "/task/" + spawned["id"]).json(), 10, message="the task")
    assert state["result"] == path
    assert (tmp_path / "out").read_text() == "done"


def test_sigterm_drains_running_tasks(server_factory, tmp_path):
    srv = server_factory(APP)
    path = tmp_path / "drained"
    requests.post(srv.url + "/spawn", data={"path": str(path), "seconds": "1"})
    srv.send_signal(signal.SIGTERM)
    assert srv.proc.wait(20) == 0
    assert path.read_text() == "done"
    assert "1 task(s) finished" in srv.log()


def test_sighup_stops_a_lone_server_gracefully_and_says_how_to_reload(server_factory, tmp_path):
    srv = server_factory(APP)
    path = tmp_path / "drained"
    requests.post(srv.url + "/spawn", data={"path": str(path), "seconds": "1"})
    srv.send_signal(signal.SIGHUP)
    assert srv.proc.wait(20) == 0, "a graceful stop, not a kill (exit 129)"
    assert path.read_text() == "done", "the running task was drained"
    log = srv.log()
    assert "--workers" in log and "shutdown complete" in log


def test_second_signal_exits_at_once(server_factory, tmp_path):
    srv = server_factory(APP, "--graceful-timeout", "60")
    marker = tmp_path / "in-flight"
    t = threading.Thread(target=lambda: _ignore_errors(
        requests.get, srv.url + "/slow", params={"seconds": "30", "marker": str(marker)}, timeout=40))
    t.daemon = True
    t.start()
    wait_for(marker.exists, 10, message="the slow request to start")
    srv.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopped accepting" in srv.log(), 10, message="shutdown to begin")
    started = time.monotonic()
    srv.send_signal(signal.SIGINT)
    assert srv.proc.wait(10) == 1
    assert time.monotonic() - started < 5
    assert "exiting now" in srv.log()


def _ignore_errors(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except requests.RequestException:
        pass


def test_unix_socket_is_served_and_removed_on_exit(server_factory, tmp_path):
    path = str(tmp_path / "gq.sock")
    srv = server_factory(APP, bind="unix:" + path)
    data = raw_request(0, b"GET /env HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                       family=socket.AF_UNIX, address=path)
    assert data.startswith(b"HTTP/1.1 200")
    assert srv.stop() == 0
    assert not os.path.exists(path)


def _ipv6_available():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_available(), reason="no IPv6 loopback on this machine")
def test_ipv6_loopback(server_factory):
    port = free_port("::1")
    server_factory(APP, bind="[::1]:%d" % port)
    data = raw_request(0, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                       family=socket.AF_INET6, address=("::1", port))
    assert data.endswith(b"Hello, greenqueue!")


def test_config_file_sets_options_and_cli_wins(server_factory, tmp_path):
    port_file, port_cli = free_port(), free_port()
    conf = tmp_path / "conf.py"
    conf.write_text("bind = ['127.0.0.1:%d']\naccess_log = '-'\nmax_headers = 3\n" % port_file)
    srv = server_factory(APP, "--config", str(conf), "--max-headers", "8", start=False)
    srv.bind = "127.0.0.1:%d" % port_cli
    srv.port = port_cli
    srv.start()
    assert requests.get(srv.url + "/").status_code == 200
    # CLI's --bind replaced the file's; CLI's --max-headers (8) beat the file's (3).
    with pytest.raises(requests.ConnectionError):
        requests.get("http://127.0.0.1:%d/" % port_file, timeout=2)
    nine = b"".join(b"X-%d: y\r\n" % i for i in range(8))
    assert raw_request(port_cli, b"GET / HTTP/1.1\r\nHost: x\r\n" + nine + b"\r\n").startswith(b"HTTP/1.1 431")
    wait_for(lambda: '"GET / HTTP/1.1" 200' in srv.log(), 5, message="the access log line")


def run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "greenqueue.server", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT))


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "expected MODULE:APP"),
    ("tests.apps.does_not_exist:app", "no module named 'tests.apps.does_not_exist'"),
    ("tests.apps.basic:nope", "has no attribute 'nope'"),
    ("tests.apps.basic:_release", "not a WSGI callable"),
    ("tests.apps.broken:app", "ZeroDivisionError"),
])
def test_bad_app_spec_is_one_clear_line_and_exit_2(spec, message):
    proc = run_cli("--bind", "127.0.0.1:%d" % free_port(), spec)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--bind", "nonsense:port"], "expected HOST:PORT"),
    (["--graceful-timeout", "-3"], "--graceful-timeout"),
    (["--log-level", "loud"], "debug, info, warning"),
    (["--forwarded-allow-ips", "not-an-ip"], "--forwarded-allow-ips"),
    (["--config", "/nonexistent/conf.py"], "no such file"),
])
def test_bad_options_exit_2(args, message):
    proc = run_cli(*args, APP)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_address_in_use_exits_2(server):
    proc = run_cli("--bind", "127.0.0.1:%d" % server.port, APP)
    assert proc.returncode == 2
    assert "address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_version_and_help_come_from_the_settings_table():
    assert run_cli("--version").stdout.startswith("greenqueue ")
    out = run_cli("--help").stdout
    for flag in ("--bind", "--config", "--graceful-timeout", "--max-connections", "--forwarded-allow-ips",
                 "--access-log", "--log-level", "--max-blocking-ms", "--dirty-app", "--header-timeout"):
        assert flag in out


MALFORMED = {
    "conflicting content-length": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "negative content-length": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "content-length with a sign": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello",
    "content-length and transfer-encoding":
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad chunk size": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "unknown transfer coding": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "chunked not last": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "space before colon in transfer-encoding":
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "bare LF in headers": b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
    "bare LF request line": b"GET / HTTP/1.1\nHost: a\n\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-Foo: a\r\n b\r\n\r\n",
    "missing host": b"GET / HTTP/1.1\r\n\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "NUL in header": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "invalid method": b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
    "unknown version": b"GET / HTTP/9.9\r\nHost: a\r\n\r\n",
    "binary garbage": b"\x00\x01garbage\r\n\r\n",
    "request line too long": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    "too many headers": b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
    "headers too large": b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 70000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_request_gets_4xx_and_others_are_still_served(server, name):
    other = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    other.request("GET", "/")
    assert other.getresponse().read() == b"Hello, greenqueue!"
    answer = raw_request(server.port, MALFORMED[name])
    status_line = answer.split(b"\r\n", 1)[0]
    assert answer == b"" or status_line[9:10] in (b"4", b"5") and not status_line.startswith(b"HTTP/1.1 500"), answer[:200]
    assert b"200 OK" not in answer
    # The same keep-alive connection opened before the bad request still works.
    other.request("GET", "/")
    assert other.getresponse().read() == b"Hello, greenqueue!"
    other.close()


def test_response_splitting_by_the_app_is_refused():
    from greenqueue._response import _Response

    class Req:
        keep_alive, method, version = True, b"GET", "1.1"

    resp = _Response(None, {}, Req())
    with pytest.raises(ValueError, match="line break"):
        resp.start_response("200 OK", [("X-Evil", "a\r\nSet-Cookie: x=1")])


def test_forwarded_headers_only_from_allowed_ips(server_factory):
    trusted = server_factory(APP)
    hdrs = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    assert requests.get(trusted.url + "/env", headers=hdrs).json()["remote_addr"] == "203.0.113.9"
    assert requests.get(trusted.url + "/env", headers=hdrs).json()["scheme"] == "https"
    untrusted = server_factory(APP, "--forwarded-allow-ips", "10.1.2.3")
    body = requests.get(untrusted.url + "/env", headers=hdrs).json()
    assert body["remote_addr"] == "127.0.0.1" and body["scheme"] == "http"


def test_500_concurrent_keep_alive_clients_are_all_served(server):
    import gevent
    from gevent import socket as gsocket

    def client(i):
        s = gsocket.create_connection(("127.0.0.1", server.port), timeout=30)
        try:
            got = []
            for _ in range(2):
                s.sendall(b"GET /env?c=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
                buf = b""
                while b"}" not in buf:
                    data = s.recv(4096)
                    if not data:
                        break
                    buf += data
                got.append(b'"c=%d"' % i in buf and buf.startswith(b"HTTP/1.1 200"))
            return all(got)
        finally:
            s.close()

    jobs = [gevent.spawn(client, i) for i in range(500)]
    gevent.joinall(jobs, timeout=60)
    assert sum(1 for j in jobs if j.successful() and j.value) == 500


def test_trickling_client_is_dropped_after_the_header_timeout(server_factory):
    srv = server_factory(APP, "--header-timeout", "1")
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(b"GET / HTTP/1.1\r\n")
    started = time.monotonic()
    closed_after = None
    served_meanwhile = 0
    # Keep trickling one header byte at a time while other clients are served.
    for _ in range(100):
        try:
            s.sendall(b"X")
        except OSError:
            closed_after = time.monotonic() - started
            break
        assert requests.get(srv.url + "/", timeout=5).status_code == 200
        served_meanwhile += 1
        s.settimeout(0.2)
        try:
            data = s.recv(1000)
        except socket.timeout:
            continue
        assert data == b"" or data.startswith(b"HTTP/1.1 408")
        closed_after = time.monotonic() - started
        break
    s.close()
    assert closed_after is not None, "the trickling client was never dropped"
    assert closed_after < 5
    assert served_meanwhile >= 1


def test_max_connections_makes_extra_clients_wait_in_the_backlog(server_factory):
    srv = server_factory(APP, "--max-connections", "2")
    held = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5) for _ in range(2)]
    for c in held:
        c.request("GET", "/")
        assert c.getresponse().read()
    waiting = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    waiting.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    waiting.settimeout(0.5)
    with pytest.raises(socket.timeout):
        waiting.recv(100)  # not accepted while two connections are open
    held[0].close()
    waiting.settimeout(10)
    assert waiting.recv(100).startswith(b"HTTP/1.1 200")
    waiting.close()
    held[1].close()


def test_max_blocking_ms_logs_the_blocking_greenlet(server_factory):
    srv = server_factory("tests.apps.blocking:app", "--max-blocking-ms", "100")
    assert requests.get(srv.url + "/block").status_code == 200
    wait_for(lambda: "hub blocked for more than 100 ms by greenlet" in srv.log(), 10, message="the blocking report")
    assert "tests/apps/blocking.py" in srv.log()


def test_startup_hook_failure_exits_1(tmp_path):
    proc = run_cli("--bind", "127.0.0.1:%d" % free_port(), "tests.apps.bad_hook:app")
    assert proc.returncode == 1
    assert "startup hook failed: RuntimeError: database unreachable" in proc.stderr
