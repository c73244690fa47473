# Two commands do everything on a fresh Debian/Ubuntu machine with Python >= 3.11:
#   make run    set up, then run Redis + S3 + API + worker in the foreground (Ctrl-C stops all)
#   make test   set up (with test tools), then lint, type-check, import contracts, all tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint setup redis-server nginx chromium clean

run: setup redis-server nginx
	$(BIN)/python deploy/devstack.py

# One pytest-xdist worker per core, whole files per worker (each worker starts its own servers);
# then test_openapi.py alone: schemathesis gives its tests one shared node id, which xdist
# would collapse into one run (tests/conftest.py refuses such files in a parallel run).
test: setup redis-server nginx chromium
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest -n auto --dist loadfile --durations=15 --ignore=tests/integration/test_openapi.py
	$(BIN)/pytest --durations=5 tests/integration/test_openapi.py

lint:
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "picstream needs Python >= 3.11 (found " + sys.version.split()[0] + "); set PYTHON=python3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,test]'
	touch $(STAMP)

# redis-server from apt when missing and we are root; otherwise say what to install.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "redis-server is missing: install it (sudo apt-get install redis-server) and re-run"; exit 1; \
	  fi; }

# nginx (the front, deploy/nginx.conf) from apt when missing and we are root; likewise.
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing nginx with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; \
	  else \
	    echo "nginx is missing: install it (sudo apt-get install nginx) and re-run"; exit 1; \
	  fi; }

# Debian's chromium for the browser tests (Playwright drives it through executable_path; no
# browser build is downloaded) from apt when missing and we are root; likewise. Recommends are
# skipped (avahi, samba, cups helpers: nothing a headless browser uses), fonts kept.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends chromium fonts-liberation >/dev/null; \
	  else \
	    echo "chromium is missing: install it (sudo apt-get install chromium) and re-run"; exit 1; \
	  fi; }

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
