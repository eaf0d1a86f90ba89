# The README's commands: `make run` (simulated daemon, local socket, no root)
# and `make test` (installs what it needs, then runs the whole suite).
# Debian's Python is used on purpose: the runtime dependencies come from
# Debian packages, as they will on the target system.

PYTHON    ?= /usr/bin/python3
RUN_DIR   ?= $(CURDIR)/run
RUNTIME_DEPS = python3-systemd python3-sdnotify python3-numpy python3-yaml
TEST_DEPS    = $(RUNTIME_DEPS) python3-pytest python3-pytest-timeout systemd
export PYTHONPATH := $(CURDIR)/src

.PHONY: run test bench lint deps-runtime deps-test clean

# Install missing Debian packages (root), or say which are missing.
define ensure_packages
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages: $$missing"; echo "run: sudo apt-get install $$missing"; exit 1; \
	  fi; \
	fi
endef

deps-runtime:
	$(call ensure_packages,$(RUNTIME_DEPS))

deps-test:
	$(call ensure_packages,$(TEST_DEPS))

run: deps-runtime
	@mkdir -p $(RUN_DIR)/models
	@[ -e $(RUN_DIR)/models/demo.hef ] || echo "simulated HEF (any content gets the default network)" > $(RUN_DIR)/models/demo.hef
	@echo "socket: $(RUN_DIR)/device.sock   models: $(RUN_DIR)/models   (Ctrl-C stops)"
	HAILO_DEVICE_BACKEND=simulated HAILO_DEVICE_SOCKET=$(RUN_DIR)/device.sock \
	HAILO_DEVICE_MODEL_DIRS=$(RUN_DIR)/models \
	$(PYTHON) -m hailo_devmgr --config $(CURDIR)/etc/hailo/device-manager.yaml

test: deps-test
	$(PYTHON) -m pytest

bench: deps-test
	$(PYTHON) bench/run.py

clean:
	rm -rf $(RUN_DIR) build dist .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
