# The README's commands: `make run` (simulated daemon, local socket, no root)
# and `make test` (installs what it needs, then runs the whole suite).
# Debian's Python is used on purpose: the runtime dependencies come from
# Debian packages, as they will on the target system.

PYTHON    ?= /usr/bin/python3
RUN_DIR   ?= $(CURDIR)/run
RUNTIME_DEPS = python3-systemd python3-numpy python3-yaml
HTTP_DEPS    = python3-aiohttp python3-prometheus-client python3-pil
DEB_DEPS     = build-essential fakeroot dpkg-dev debhelper dh-python python3-all python3-setuptools lintian python3-stdeb
E2E_DEPS     = systemd-container debootstrap
TEST_DEPS    = $(RUNTIME_DEPS) $(HTTP_DEPS) $(DEB_DEPS) $(E2E_DEPS) python3-pytest python3-pytest-timeout systemd \
               python3-hypothesis python3-venv
DEB_DIR     ?= $(CURDIR)/build/deb
# The official Ollama and OpenAI clients the gateway tests run unchanged
# (PyPI only, pinned), in a venv that also sees Debian's packages.
CLIENT_VENV     ?= $(CURDIR)/build/client-venv
CLIENT_PACKAGES  = ollama==0.6.3 openai==3.60.0
# Fuzzing: atheris run length for `make fuzz` and for the short run in `make test`.
FUZZ_SECONDS       ?= 300
FUZZ_SMOKE_SECONDS ?= 25
SOAK_SECONDS       ?= 120
export PYTHONPATH := $(CURDIR)/src

.PHONY: client-venv run test e2e newcomer bench fuzz soak deb stdeb deps-runtime deps-test deps-deb clean

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

deps-deb:
	$(call ensure_packages,$(DEB_DEPS) $(RUNTIME_DEPS) $(HTTP_DEPS))

run: deps-runtime
	@mkdir -p $(RUN_DIR)/models
	@[ -e $(RUN_DIR)/models/demo.hef ] || echo "simulated HEF (any content gets the default network)" > $(RUN_DIR)/models/demo.hef
	@echo "socket: $(RUN_DIR)/device.sock   models: $(RUN_DIR)/models   (Ctrl-C stops)"
	HAILO_DEVICE_BACKEND=simulated HAILO_DEVICE_SOCKET=$(RUN_DIR)/device.sock \
	HAILO_DEVICE_MODEL_DIRS=$(RUN_DIR)/models \
	$(PYTHON) -m hailo_devmgr --config $(CURDIR)/etc/hailo/device-manager.yaml

# pip installs nothing (and asks no index) when the pinned versions are there.
client-venv: deps-test
	@[ -x $(CLIENT_VENV)/bin/python ] || $(PYTHON) -m venv --system-site-packages $(CLIENT_VENV)
	@$(CLIENT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-input $(CLIENT_PACKAGES)

# The short atheris pass first, so pytest's summary is the last line printed.
test: deps-test client-venv
	@FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS) PYTHON=$(PYTHON) fuzz/atheris.sh --optional
	HAILO_CLIENT_VENV=$(CLIENT_VENV) $(PYTHON) -m pytest

# The real-systemd end-to-end test alone; fails (never skips) when this
# machine cannot boot a container (needs root, systemd-nspawn, debootstrap).
e2e: deps-test
	HAILO_E2E_REQUIRED=1 $(PYTHON) -m pytest tests/test_e2e_systemd.py

# The README's two commands in a pristine minbase container of each Debian
# release, the checkout at a mode-0700 path, LANG=C, no HOME (root, nspawn;
# not part of `make test`: about 10 minutes a release).
newcomer: deps-test
	$(PYTHON) tests/newcomer.py

bench: deps-test
	$(PYTHON) bench/run.py
	$(PYTHON) bench/scheduling.py
	$(PYTHON) bench/transport.py
	$(PYTHON) bench/small_requests.py
	$(PYTHON) bench/gateway.py

# Fuzzing, longer than `make test` does it: the hypothesis suites with the
# long profile (failures saved in build/hypothesis), then atheris
# (installed with pip into build/fuzz-venv) for FUZZ_SECONDS.
fuzz: deps-test
	HYPOTHESIS_PROFILE=long $(PYTHON) -m pytest -q --timeout=900 tests/test_fuzz_properties.py tests/test_fuzz_daemon.py \
	    tests/test_fuzz_regressions.py tests/test_model_files_open.py
	@FUZZ_SECONDS=$(FUZZ_SECONDS) PYTHON=$(PYTHON) fuzz/atheris.sh

# 32 clients, every action, bad input and abrupt disconnects for SOAK_SECONDS
# (default 120); fails only on a lost, crossed or unexpected answer or an fd leak.
soak: deps-runtime
	$(PYTHON) bench/soak.py --seconds $(SOAK_SECONDS)

# Build from a copy of the tree, so dpkg-buildpackage's output (written to
# the parent folder) and build files stay under build/.
deb: deps-deb
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	tar -c --exclude=./build --exclude=./run --exclude=./.git --exclude=__pycache__ . | tar -x -C $(DEB_DIR)/src
	# Debian's own Python and tools only (a pyenv or venv on PATH must not leak in).
	cd $(DEB_DIR)/src && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b
	@echo "packages in $(DEB_DIR):" && ls $(DEB_DIR)/*.deb

# The quick route for hosts that only need the client library (see stdeb.cfg).
stdeb: deps-deb
	rm -rf $(DEB_DIR)/stdeb && mkdir -p $(DEB_DIR)/stdeb
	tar -c --exclude=./build --exclude=./run --exclude=./.git --exclude=./debian --exclude=__pycache__ . | tar -x -C $(DEB_DIR)/stdeb
	# debian/ stays out (stdeb writes its own), but setup.py takes the version from the changelog.
	mkdir -p $(DEB_DIR)/stdeb/debian && cp debian/changelog $(DEB_DIR)/stdeb/debian/
	cd $(DEB_DIR)/stdeb && env PATH=/usr/sbin:/usr/bin:/sbin:/bin python3 setup.py --command-packages=stdeb.command bdist_deb
	@echo "package in $(DEB_DIR)/stdeb/deb_dist:" && ls $(DEB_DIR)/stdeb/deb_dist/*.deb

clean:
	rm -rf $(RUN_DIR) build dist .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
