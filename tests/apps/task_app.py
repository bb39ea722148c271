"""A Flask app whose views and tasks check which context a task runs in."""

import flask

from greenqueue import task

app = flask.Flask(__name__)
app.config["GREETING"] = "hello from config"


@task
def read_context():
    """Report what the task sees: the app's config, and whether a request leaked in."""
    return {
        "app": flask.current_app.name,
        "greeting": flask.current_app.config["GREETING"],
        "has_request": flask.has_request_context(),
    }


@app.route("/spawn")
def spawn_view():
    r = read_context.spawn()
    return {"id": r.id}


@app.route("/result/<task_id>")
def result_view(task_id):
    import greenqueue
    r = greenqueue.result(task_id)
    if r is None:
        flask.abort(404)
    return {"state": r.state, "value": r.result if r.successful() else None}
