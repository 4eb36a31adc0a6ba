# Two commands on a fresh clone (only python3 and make needed):
#   make run     create .venv and run pushsvc on the embedded default (SQLite, in-process broker)
#   make check   create .venv and run the whole check: ruff, ruff format, mypy, pytest
#                (and the delivery, gateway, API tests again on the async broker, and
#                the units under a real systemd: make test-systemd)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The frame path compiled with mypyc (setup.py's COMPILED list): rebuilt in place when one
# of its modules changes, so that nothing runs a stale .so (tests/test_build.py checks).
COMPILED := $(shell sed -n '/^COMPILED = \[/,/^\]/p' setup.py | grep -o 'pushsvc/[a-z_/]*\.py')
BUILT := $(VENV)/.compiled
PYTEST_ARGS ?=

.PHONY: run cluster check lint test test-async test-systemd tools bench fuzz soak clean

$(STAMP): setup.cfg pyproject.toml tests/example_plugin/setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PUSHSVC_COMPILE=0 $(BIN)/pip install --quiet -e '.[dev,redis]' ./tests/example_plugin
	touch $(STAMP)

$(BUILT): $(STAMP) $(COMPILED) setup.py
	find pushsvc -name '*.so' -delete
	$(BIN)/python setup.py --quiet build_ext --inplace
	touch $(BUILT)

run: $(BUILT)
	$(BIN)/pushsvc serve --dev

# Three nodes on one redis-server behind a round-robin balancer on :8888 (contrib/cluster.py).
cluster: $(BUILT)
	$(BIN)/python contrib/cluster.py --nodes 3

lint: $(BUILT)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# tests/test_systemd_real.py runs in test-systemd (it may first build a Debian image).
test: $(BUILT)
	$(BIN)/pytest --ignore=tests/test_systemd_real.py $(PYTEST_ARGS)

# The delivery, gateway and API tests again on the asynchronous in-memory broker
# (delivery on a later loop pass, as over a network; docs/broker.md).
test-async: $(BUILT)
	PUSHSVC_BROKER__URL='memory://?delivery=async' $(BIN)/pytest $(PYTEST_ARGS) \
		tests/test_delivery.py tests/test_gateway.py tests/test_api.py

# pushsvc installed per docs/deploy.md in a Debian 12 booted under its own systemd with
# systemd-nspawn (root only, else skipped with the reason). The first run builds the image
# with debootstrap (1.5-2.5 min, cached in /var/cache/pushsvc-test); then about 65 s.
# -rP prints each test's figures.
test-systemd: $(BUILT)
	$(BIN)/pytest -rP $(PYTEST_ARGS) tests/test_systemd_real.py

# Best effort: in CI (CI set, running as root) install promtool and prometheus (Debian
# package 'prometheus'), Chromium (the browser test), Node.js, redis-server, and debootstrap
# with systemd-nspawn (tests/test_systemd_real.py boots a Debian under a real systemd) for
# the tests that use them; they skip when absent.
tools:
	@if [ -n "$$CI" ] && [ "$$(id -u)" = 0 ]; then \
		missing=""; \
		command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
		command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
		command -v node >/dev/null 2>&1 || missing="$$missing nodejs npm"; \
		command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
		command -v debootstrap >/dev/null 2>&1 || missing="$$missing debootstrap"; \
		command -v systemd-nspawn >/dev/null 2>&1 || missing="$$missing systemd-container"; \
		if [ -n "$$missing" ]; then \
			echo "tools: installing the Debian packages$$missing"; \
			( apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			  apt-get install -y -qq --no-install-recommends $$missing >/dev/null ) \
			|| echo "tools: could not install$$missing; the tests that need them will be skipped"; \
		fi; \
	fi

check: tools lint test test-async test-systemd

# Coverage-guided fuzzing with atheris (fuzz/targets.py), FUZZ_SECONDS per target; new
# inputs go to .fuzz/TARGET, crashes to .fuzz/crash-* (add each to tests/test_fuzz.py).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := frame_reader upgrade_parser frame_decoder jwt_front config_loader
fuzz: $(STAMP)
	@for target in $(FUZZ_TARGETS); do \
		mkdir -p .fuzz/$$target; \
		echo "fuzz: $$target for $(FUZZ_SECONDS)s"; \
		$(BIN)/python fuzz/run.py $$target -max_total_time=$(FUZZ_SECONDS) \
			-artifact_prefix=.fuzz/ .fuzz/$$target fuzz/seeds/$$target > .fuzz/$$target.log 2>&1 \
			|| { tail -40 .fuzz/$$target.log; exit 1; }; \
		grep '^Done' .fuzz/$$target.log; \
	done

# Rounds of 1,000 clients connecting, joining, chatting, acking and leaving, then a leak
# check and a reconnect storm (bench/soak.py; figures in docs/performance.md).
soak: $(BUILT)
	$(BIN)/python bench/soak.py --rounds 5 --clients 1000 --storm 10000 --restart-storm 10000

bench: $(BUILT)
	bench/peers.sh
	$(BIN)/python bench/durable.py
	$(BIN)/python bench/features.py
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build
	find pushsvc -name '*.so' -delete
