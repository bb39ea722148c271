# The two commands a new user runs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APP    ?= examples.streaming_chat.app:app
DIRTY  ?= examples.streaming_chat.chat_app:ChatApp

.PHONY: run run-django test bench clean

$(STAMP): setup.cfg setup.py pyproject.toml scripts/bootstrap.sh
	PYTHON=$(PYTHON) scripts/bootstrap.sh
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m greenqueue.server --bind 127.0.0.1:8000 --dirty-app $(DIRTY) \
		--dashboard-path /_greenqueue --metrics-path /metrics $(APP)

# The Django example: its tasks run in the server, its journal is an SQLite file, mail is printed.
run-django: $(STAMP)
	$(BIN)/python examples/django_app/manage.py migrate --noinput -v 0
	$(BIN)/python -m greenqueue.server --bind 127.0.0.1:8000 --journal examples/django_app/journal.db \
		--dashboard-path /_greenqueue examples.django_app.mysite.wsgi:application

test: $(STAMP)
	$(BIN)/python -m mypy greenqueue
	scripts/system-deps.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	scripts/system-deps.sh
	$(BIN)/python bench/run.py $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) build dist *.egg-info test-artifacts
