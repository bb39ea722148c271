# The two commands a new user runs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# What each command needs installed: the chat alone for `make run`, everything for tests and benches.
RUN_STAMP  := $(VENV)/.installed-run
FULL_STAMP := $(VENV)/.installed-full
APP    ?= examples.streaming_chat.app:app
DIRTY  ?= examples.streaming_chat.chat_app:ChatApp

.PHONY: run run-django test bench dist clean

# Rebuilds the compiled request path when its sources changed since the last build (greenqueue would
# otherwise run their Python source: correct, only slower); a no-op when the build is current.
COMPILED = @$(BIN)/python -c 'import sys, greenqueue._accel as a; sys.exit(a.status() != "compiled")' 2>/dev/null \
	|| $(BIN)/python setup.py -q build_ext --inplace \
	|| echo "make: the compiled request path did not build; greenqueue runs its Python source" >&2

$(RUN_STAMP): setup.cfg setup.py pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) EXTRAS=chat scripts/bootstrap.sh
	touch $(RUN_STAMP)

$(FULL_STAMP): setup.cfg setup.py pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) EXTRAS=examples,test,bench scripts/bootstrap.sh
	touch $(FULL_STAMP) $(RUN_STAMP)

run: $(RUN_STAMP)
	$(COMPILED)
	$(BIN)/python -m greenqueue.server --bind 127.0.0.1:8000 --dirty-app $(DIRTY) \
		--dashboard-path /_greenqueue --metrics-path /metrics $(APP)

# The Django example: its tasks run in the server, its journal is an SQLite file, mail is printed.
run-django: $(FULL_STAMP)
	$(BIN)/python examples/django_app/manage.py migrate --noinput -v 0
	$(BIN)/python -m greenqueue.server --bind 127.0.0.1:8000 --journal examples/django_app/journal.db \
		--dashboard-path /_greenqueue examples.django_app.mysite.wsgi:application

test: $(FULL_STAMP)
	$(COMPILED)
	$(BIN)/python -m mypy greenqueue
	scripts/system-deps.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(FULL_STAMP)
	$(COMPILED)
	scripts/system-deps.sh
	$(BIN)/python bench/run.py $(if $(QUICK),--quick)

# An sdist and a wheel in dist/, checked as a package index would check them.
dist: $(FULL_STAMP)
	rm -rf dist build
	$(BIN)/python -m build --sdist --wheel --outdir dist .
	$(BIN)/python -m twine check --strict dist/*

clean:
	rm -rf $(VENV) build dist *.egg-info test-artifacts greenqueue/_compiled
