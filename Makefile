# Two commands for a newcomer: `make run` and `make test`. Only Python 3.11+ and make
# are needed: the virtualenv, the locked dependencies and (with DATABASE_URL unset) an
# embedded PostgreSQL are set up here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < requirements.lock | cut -d' ' -f1)

.PHONY: install run test lint typecheck check lock db db-stop clean

install: $(STAMP) .env.development

# Local development settings for plain `python manage.py ...` in this checkout only.
.env.development:
	printf 'DJANGO_DEBUG=1\nDJANGO_SECRET_KEY=%s\n' "$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))')" > $@

$(STAMP): requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	rm -f $(VENV)/.installed-*
	touch $@

run: install
	$(BIN)/python -m config.launch run

test: install
	$(BIN)/python -m config.launch test $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	DJANGO_DEBUG=1 DATABASE_URL=$${DATABASE_URL:-postgresql://localhost/unused} $(BIN)/mypy ledger

check: lint typecheck test

# Re-pin after editing pyproject.toml (needs uv: pip install uv).
lock:
	uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 -o requirements.lock

db: install
	$(BIN)/python -m config.embedded_pg start

db-stop: install
	$(BIN)/python -m config.embedded_pg stop

clean: db-stop
	rm -rf $(VENV) .pgdata .static
