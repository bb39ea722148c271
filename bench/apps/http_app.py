"""The Flask app every HTTP bench serves: a hello world and a 4 KiB JSON document."""

from flask import Flask, jsonify

app = Flask(__name__)
_DOC = {"items": [{"id": i, "name": "item-%04d" % i, "ok": True} for i in range(100)]}


@app.get("/")
def hello():
    return "Hello, World!"


@app.get("/json")
def doc():
    return jsonify(_DOC)
