"""Run a real nginx in front of a real greenqueue server, from nginx/greenqueue.conf."""

import os
import signal
import subprocess
import time

from .conftest import ROOT, ServerProcess, free_port, require_binary, wait_for

CHAT_POOL = "examples.streaming_chat.chat_app:ChatApp"
CHAT_APP = "examples.streaming_chat.app:app"


def render_site(sock_path, port):
    """The production server block with only its paths and listen port changed."""
    text = (ROOT / "nginx" / "greenqueue.conf").read_text()
    replacements = {
        "unix:/run/greenqueue/greenqueue.sock": "unix:" + str(sock_path),
        "/srv/greenqueue/": str(ROOT) + "/",
        "/etc/nginx/greenqueue_proxy.conf": str(ROOT / "nginx" / "greenqueue_proxy.conf"),
        "listen 80;": "listen 127.0.0.1:%d;" % port,
    }
    for old, new in replacements.items():
        assert old in text, "nginx/greenqueue.conf no longer contains %r" % old
        text = text.replace(old, new)
    return text


MAIN_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;
    types {{ text/css css; application/javascript js; text/html html; }}
    include {prefix}/site.conf;
}}
"""


class NginxFront:
    """greenqueue on a unix socket plus nginx on a loopback port in front of it."""

    def __init__(self, tmp_path, app=CHAT_APP, args=("--dirty-app", CHAT_POOL), env=None):
        self.nginx_bin = require_binary("nginx", "nginx")
        self.prefix = tmp_path / "nginx"
        self.prefix.mkdir()
        self.sock = tmp_path / "gq.sock"
        self.port = free_port()
        self.server = ServerProcess(app, *args, bind="unix:" + str(self.sock), env=env, tmp_path=tmp_path)
        self.proc = None

    @property
    def url(self):
        """nginx's base URL."""
        return "http://127.0.0.1:%d" % self.port

    def start(self):
        """Start greenqueue, then nginx; wait until nginx answers through to the app."""
        self.server.start()
        (self.prefix / "site.conf").write_text(render_site(self.sock, self.port))
        conf = self.prefix / "nginx.conf"
        conf.write_text(MAIN_CONF.format(prefix=self.prefix))
        base = [self.nginx_bin, "-p", str(self.prefix), "-c", str(conf), "-e", str(self.prefix / "error.log")]
        check = subprocess.run(base + ["-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        import requests

        def up():
            assert self.proc.poll() is None, (self.prefix / "error.log").read_text()
            try:
                return requests.get(self.url + "/health", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False
        wait_for(up, 20, message="nginx in front of greenqueue")
        return self

    def stop(self):
        """Stop nginx and greenqueue."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        status = self.server.stop()
        return status


def read_sse(response):
    """Yield ``(arrival_seconds, event_type, data)`` for each SSE event of a streamed response."""
    started = time.monotonic()
    event, data = "message", []
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if data:
                yield time.monotonic() - started, event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
