# Weft. Every target installs what it needs; run as root on Debian 12.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUILD := .build
# ../shared beside the checkout; a clone elsewhere falls back to the workspace's copy.
SHARED ?= $(firstword $(wildcard ../shared $(CURDIR)/../shared /work/shared))
CNIDRIVE := $(BUILD)/cnidrive
DIST := $(BUILD)/dist
BUNDLE := $(DIST)/weft
# make install: the bundle under $(PREFIX)/lib/weft, weftd in $(PREFIX)/bin, the CNI plugins and an
# example conflist where containerd looks for them. DESTDIR stages the whole tree elsewhere.
PREFIX ?= /usr/local
DESTDIR ?=
CNI_BIN_DIR ?= /opt/cni/bin
CNI_CONF_DIR ?= /etc/cni/net.d
SOURCES := $(wildcard cni_plugin/*.py ipam/*.py weftd/*.py weftd/*/*.py) packaging/entry.py packaging/bootstrap.py packaging/weft.spec
DEBS := iproute2 nftables iptables containernetworking-plugins golang-go golang-github-appc-cni-dev \
        iputils-ping procps etcd-server iperf3

.PHONY: all deps venv cnidrive build install uninstall test lint demo bench clean

all: venv

deps: $(BUILD)/.debs
$(BUILD)/.debs:
	@mkdir -p $(BUILD)
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	@touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml | $(BUILD)/.debs
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

cnidrive: $(CNIDRIVE)
$(CNIDRIVE): | $(BUILD)/.debs
	@test -n "$(SHARED)" || { echo "../shared/tools/cnidrive not found"; exit 1; }
	bash $(SHARED)/tools/cnidrive/build.sh $(CURDIR)/$(CNIDRIVE) >/dev/null

# Self-contained executables (PyInstaller, onedir): weft-ipam and weftd are names of the one program.
build: $(BUNDLE)/weft
$(BUNDLE)/weft: $(SOURCES) | $(VENV)/.installed
	$(VENV)/bin/pyinstaller --noconfirm --log-level WARN --distpath $(DIST) --workpath $(BUILD)/pyinstaller \
	  packaging/weft.spec
	ln -sfn weft $(BUNDLE)/weft-ipam
	ln -sfn weft $(BUNDLE)/weftd
	@touch $@

install: build
	sh packaging/install.sh install $(BUNDLE) $(DESTDIR)$(PREFIX)/lib/weft $(DESTDIR)$(CNI_BIN_DIR) \
	  $(DESTDIR)$(PREFIX)/bin conf/10-weft.conflist $(DESTDIR)$(CNI_CONF_DIR)

uninstall:
	sh packaging/install.sh remove $(DESTDIR)$(PREFIX)/lib/weft $(DESTDIR)$(CNI_BIN_DIR) $(DESTDIR)$(PREFIX)/bin \
	  10-weft.conflist $(DESTDIR)$(CNI_CONF_DIR)

test: deps venv cnidrive build lint
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) WEFT_BUNDLE=$(CURDIR)/$(BUNDLE) $(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check cni_plugin ipam weftd tests bench packaging/*.py
	$(VENV)/bin/mypy cni_plugin ipam weftd

demo: deps venv cnidrive
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) $(PY) -m tests.demo

bench: deps venv cnidrive build
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) WEFT_BUNDLE=$(CURDIR)/$(BUNDLE) $(PY) -m bench.plugin_bench
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) WEFT_BUNDLE=$(CURDIR)/$(BUNDLE) $(PY) -m bench.weftd_bench

clean:
	rm -rf $(BUILD) $(VENV) *.egg-info
