"""An app whose start-up hook fails: the server must exit 1 with one clear line."""

from flask import Flask

import greenqueue

app = Flask(__name__)


@greenqueue.on_startup
def connect():
    raise RuntimeError("database unreachable")
