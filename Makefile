# Weft. Every target installs what it needs; run as root on Debian 12.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUILD := .build
# ../shared beside the checkout; a clone elsewhere falls back to the workspace's copy.
SHARED ?= $(firstword $(wildcard ../shared $(CURDIR)/../shared /work/shared))
CNIDRIVE := $(BUILD)/cnidrive
DEBS := iproute2 nftables iptables containernetworking-plugins golang-go golang-github-appc-cni-dev \
        iputils-ping procps etcd-server iperf3

.PHONY: all deps venv cnidrive test lint demo bench clean

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

test: deps venv cnidrive lint
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) $(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check cni_plugin ipam weftd tests bench
	$(VENV)/bin/mypy cni_plugin ipam weftd

demo: deps venv cnidrive
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) $(PY) -m tests.demo

bench: deps venv cnidrive
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) $(PY) -m bench.weftd_bench

clean:
	rm -rf $(BUILD) $(VENV) *.egg-info
