"""Docs cannot drift: the README's option table and public names match the code."""

import re

from greenqueue import config

from .conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_every_server_option_is_in_the_readme_table():
    for setting in config.SETTINGS:
        flag = config._FLAG_OVERRIDES.get(setting.name, setting.option)
        row = re.search(r"^\| `%s[ `].*$" % re.escape(flag), README, re.M)
        assert row, "README's option table lacks %s" % flag
        assert setting.help in row.group(0), "README's row for %s differs from its help text" % flag


def test_readme_shows_the_two_commands():
    assert "make run" in README and "make test" in README


def test_public_names_resolve():
    import greenqueue

    missing = []
    for name in greenqueue.__all__:
        try:
            getattr(greenqueue, name)
        except (AttributeError, ImportError) as exc:
            missing.append("%s (%s)" % (name, exc))
    assert not missing, "greenqueue.__all__ names that do not import: %s" % ", ".join(missing)


def _python_block_after(heading):
    section = README[README.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def test_readme_flask_example_runs_in_the_real_server(server_factory, tmp_path):
    import requests

    (tmp_path / "readme_app.py").write_text(_python_block_after("## Your own Flask app"))
    srv = server_factory("readme_app:app", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    r = requests.post(srv.url + "/signup", timeout=5)
    assert r.status_code == 200 and r.text == "welcome!"
    assert srv.stop() == 0
    log = srv.log()
    assert "readme_app.send_welcome" in log  # the task's events reached the log
