"""A Flask app with a fast periodic job, for the real-time scheduler test."""

from flask import Flask, jsonify

from greenqueue import every, periodic

app = Flask(__name__)
fired = []


@periodic(every(seconds=0.2))
def tick():
    import time
    fired.append(time.monotonic())


@app.get("/fired")
def count():
    return jsonify(count=len(fired), first=fired[0] if fired else None, last=fired[-1] if fired else None)
