# Weft. Every target installs what it needs; run as root on Debian 12.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUILD := .build
CNIDRIVE := $(BUILD)/cnidrive
DIST := $(BUILD)/dist
BUNDLE := $(DIST)/weft
SHIM := $(BUILD)/weft-shim
CC := gcc
SHIM_CFLAGS := -std=c11 -Wall -Wextra -Werror -O2 -static
# make install: the bundle under $(PREFIX)/lib/weft, weftd in $(PREFIX)/bin, the CNI plugins and an
# example conflist where containerd looks for them. DESTDIR stages the whole tree elsewhere. The
# example is written only where $(CNI_CONF_DIR) holds no 10-weft.conflist: any existing one is
# weftd's (on a node running weftd) or the operator's, and is left as it is; make uninstall removes
# the file only while it still holds the example (packaging/install.sh).
PREFIX ?= /usr/local
DESTDIR ?=
CNI_BIN_DIR ?= /opt/cni/bin
CNI_CONF_DIR ?= /etc/cni/net.d
SOURCES := $(wildcard weftlib/*.py weftlib/*/*.py cni_plugin/*.py ipam/*.py weftd/*.py weftd/*/*.py weftd/*/*/*.py) \
           packaging/entry.py packaging/bootstrap.py packaging/weft.spec packaging/check_bundle.py
# Debian packages every target needs, one a line. Installed with --no-install-recommends (without it
# apt pulls a kernel image for wireguard).
DEBS := \
	iproute2 \
	nftables \
	iptables \
	containernetworking-plugins \
	golang-go \
	golang-github-appc-cni-dev \
	golang-github-modern-go-reflect2-dev \
	iputils-ping \
	procps \
	etcd-server \
	iperf3 \
	containerd \
	runc \
	umoci \
	mmdebstrap \
	dnsutils \
	binutils \
	busybox-static \
	libpython3.11 \
	python3-venv \
	gcc \
	libc6-dev \
	valgrind \
	tcpdump \
	rsync \
	dpkg-dev \
	openssl \
	wireguard-go \
	wireguard-tools \
	conntrack
# What the targets run, as program-or-path:package, one a line: checked after installing, so a
# missing one fails `make deps` naming the package that brings it.
NEEDS := \
	ip:iproute2 \
	nft:nftables \
	iptables:iptables \
	/usr/lib/cni/bridge:containernetworking-plugins \
	/usr/lib/cni/host-local:containernetworking-plugins \
	go:golang-go \
	/usr/share/gocode/src/github.com/containernetworking/cni:golang-github-appc-cni-dev \
	/usr/share/gocode/src/github.com/modern-go/reflect2/go.mod:golang-github-modern-go-reflect2-dev \
	ping:iputils-ping \
	sysctl:procps \
	etcd:etcd-server \
	iperf3:iperf3 \
	containerd:containerd \
	ctr:containerd \
	runc:runc \
	umoci:umoci \
	mmdebstrap:mmdebstrap \
	dig:dnsutils \
	mmtarfilter:mmdebstrap \
	readelf:binutils \
	strip:binutils \
	/bin/busybox:busybox-static \
	/usr/lib/$(shell gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)/libpython3.11.so.1.0:libpython3.11 \
	gcc:gcc \
	/usr/include/stdio.h:libc6-dev \
	valgrind:valgrind \
	tcpdump:tcpdump \
	rsync:rsync \
	dpkg-source:dpkg-dev \
	apt-get:apt \
	openssl:openssl \
	wireguard-go:wireguard-go \
	wg:wireguard-tools \
	conntrack:conntrack
# Kubernetes binaries, built once per machine from Debian's kubernetes source package
# (tools/kube/build.sh) and cached under $(BUILD)/kube/<source version>/. The kube tests run
# kube-apiserver, or the one WEFT_KUBE_APISERVER names (another checkout's, say).
KUBE_BIN := $(BUILD)/kube/current
KUBE_APISERVER_LINK := $(KUBE_BIN)/kube-apiserver
# OCI image archives for `ctr -n k8s.io images import`, built without docker or a registry
# (tools/images/): Weft's own, and the images a Kubernetes 1.20 cluster and its e2e tests ask for,
# under their upstream names.
IMAGES := $(BUILD)/images
PAUSE_IMAGE := k8s.gcr.io/pause:3.2
AGNHOST_IMAGE := k8s.gcr.io/e2e-test-images/agnhost:2.21
BUSYBOX_IMAGE := docker.io/library/busybox:1.29
DNSUTILS_IMAGE := gcr.io/kubernetes-e2e-test-images/jessie-dnsutils:1.0
# The cluster of `make cluster` (tests/k8s): nodes, the control-plane node included.
CLUSTER_NODES ?= 3

.PHONY: all deps venv cnidrive kube-apiserver kube kubectl cluster cluster-down shim build image node-images test-images agnhost-image install \
  uninstall test test-long unit lint docs demo bench pod-start-bench clean fresh-check clusterdns-image e2e

all: venv

deps: $(BUILD)/.debs
$(BUILD)/.debs: Makefile
	@mkdir -p $(BUILD)
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@fail=; for need in $(NEEDS); do what=$${need%:*}; pkg=$${need##*:}; \
	  case $$what in /*) test -e $$what ;; *) command -v $$what >/dev/null ;; esac || \
	  { echo "make deps: $$what is missing: install the Debian package $$pkg" >&2; fail=1; }; \
	done; test -z "$$fail"
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || \
	  { echo "make deps: $(PYTHON) cannot create a venv: install the Debian package python3-venv" >&2; exit 1; }
	@touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml | $(BUILD)/.debs
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# The CNI runtime the tests, the demo and the benches drive plugins with (tools/cnidrive): libcni from
# Debian's golang-github-appc-cni-dev, built in GOPATH mode against /usr/share/gocode (no module download).
cnidrive: $(CNIDRIVE)
$(CNIDRIVE): tools/cnidrive/main.go | $(BUILD)/.debs
	GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=$(CURDIR)/$(BUILD)/go-cache \
	  go build -trimpath -o $@ ./tools/cnidrive

# The real kube-apiserver the kube tests run (about 5 minutes on 2 cores, once per machine).
kube-apiserver: | $(BUILD)/.debs
	@if [ -n "$$WEFT_KUBE_APISERVER" ]; then \
	  test -x "$$WEFT_KUBE_APISERVER" || { echo "WEFT_KUBE_APISERVER=$$WEFT_KUBE_APISERVER is not executable" >&2; exit 1; }; \
	else bash tools/kube/build.sh $(BUILD) kube-apiserver >/dev/null; fi

# The test cluster's DNS (tools/clusterdns: test-bed infrastructure, not part of Weft) as an OCI archive for
# `ctr -n k8s.io images import`.
clusterdns-image: $(IMAGES)/clusterdns.tar
$(IMAGES)/clusterdns.tar: tools/clusterdns/server.py tools/clusterdns/image.sh tools/images/lib.sh | $(BUILD)/.debs
	bash tools/clusterdns/image.sh $@

# Every Kubernetes binary a cluster node and the control plane run (minutes, once per machine).
kube: | $(BUILD)/.debs
	bash tools/kube/build.sh $(BUILD) kube-apiserver kubelet kube-proxy kube-scheduler kube-controller-manager >/dev/null

# kubectl of the same version, from Debian's kubernetes-client, unpacked beside them: the package itself
# is not installed, since its /usr/bin/kubectl would clash with a kubectl the machine may already have.
kubectl: $(KUBE_BIN)/kubectl
$(KUBE_BIN)/kubectl: | kube
	@d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && cd "$$d" && \
	  { apt-get -o APT::Sandbox::User=root download -qq kubernetes-client 2>/dev/null || \
	    { apt-get update -qq && apt-get -o APT::Sandbox::User=root download -qq kubernetes-client; }; } && \
	  dpkg-deb -x kubernetes-client_*.deb x && install -m 755 x/usr/bin/kubectl $(CURDIR)/$@

# A Kubernetes cluster of CLUSTER_NODES namespace nodes with Weft from conf/kube-weft.yml and the test
# bed's cluster DNS (tools/clusterdns), left running
# (kubeconfig: $(BUILD)/cluster/kubeconfig); cluster-down stops and removes all of it.
cluster: deps venv kube kubectl image test-images clusterdns-image
	$(PY) -m tests.k8s up --nodes $(CLUSTER_NODES)

cluster-down: venv
	$(PY) -m tests.k8s down

# The `weft` executable containerd runs: a static C shim that hands each invocation to weftd and
# execs `weft-py` beside it when weftd is not there (docs/architecture.md, "How a pod is attached").
shim: $(SHIM)
$(SHIM): shim/weft-shim.c | $(BUILD)/.debs
	$(CC) $(SHIM_CFLAGS) -o $@ $<

# Self-contained executables (PyInstaller, onedir): weft-py, weft-ipam and weftd are names of the one
# Python program, and `weft` is the shim.
build: $(BUNDLE)/weft
$(BUNDLE)/weft-py: $(SOURCES) | $(VENV)/.installed
	$(VENV)/bin/pyinstaller --noconfirm --log-level WARN --distpath $(DIST) --workpath $(BUILD)/pyinstaller \
	  packaging/weft.spec
	$(PY) packaging/check_bundle.py $(BUNDLE) || { rm -f $@; exit 1; }
	ln -sfn weft-py $(BUNDLE)/weft-ipam
	ln -sfn weft-py $(BUNDLE)/weftd
	@touch $@
$(BUNDLE)/weft: $(SHIM) $(BUNDLE)/weft-py
	cp $(SHIM) $@.tmp && mv -f $@.tmp $@

# Weft's image, docker.io/library/weft:<version> (the manifest's weft:<version>): the frozen bundle on
# Debian's minbase with the packages weftd runs on a node, as the Dockerfile describes it. The Debian
# root filesystem is cached under $(IMAGES)/rootfs by package list; the bundle's layer is redone.
image: $(IMAGES)/weft.tar
$(IMAGES)/weft.tar: $(BUNDLE)/weft packaging/install.sh tools/images/weft.sh tools/images/lib.sh | $(BUILD)/.debs
	bash tools/images/weft.sh $(BUNDLE) $@

# The images the cluster's nodes and the e2e tests run: pause and busybox (small, seconds), and agnhost
# (its own target: a Debian root filesystem of the tests' tools, and agnhost built from the Kubernetes
# tree, minutes on a fresh machine).
# node-images: what every node runs and the smoke test needs (seconds); test-images adds the e2e tests' own.
node-images: $(IMAGES)/pause.tar $(IMAGES)/busybox.tar
test-images: node-images $(IMAGES)/jessie-dnsutils.tar agnhost-image
agnhost-image: $(IMAGES)/agnhost.tar
# pause.c comes from the Kubernetes source tree, which tools/kube/build.sh unpacks with the first
# binary it builds: kube-apiserver, which `make test` needs anyway.
$(IMAGES)/pause.tar: tools/images/pause.sh tools/images/lib.sh | $(KUBE_BIN)/src/.weft-prepared
	bash tools/images/pause.sh $(KUBE_BIN)/src $(PAUSE_IMAGE) $@
$(KUBE_BIN)/src/.weft-prepared: | $(BUILD)/.debs
	bash tools/kube/build.sh $(BUILD) kube-apiserver >/dev/null
$(IMAGES)/busybox.tar: tools/busybox-image.sh | $(BUILD)/.debs
	@mkdir -p $(IMAGES)
	bash tools/busybox-image.sh $@ $(BUSYBOX_IMAGE) sh
$(IMAGES)/jessie-dnsutils.tar: tools/images/jessie-dnsutils.sh tools/images/lib.sh | $(BUILD)/.debs
	bash tools/images/jessie-dnsutils.sh $(DNSUTILS_IMAGE) $@
$(IMAGES)/agnhost.tar: $(KUBE_BIN)/agnhost tools/images/agnhost.sh tools/images/lib.sh
	bash tools/images/agnhost.sh $(KUBE_BIN)/agnhost $(KUBE_BIN)/src $(AGNHOST_IMAGE) $@
$(KUBE_BIN)/agnhost: | $(BUILD)/.debs
	bash tools/kube/build.sh $(BUILD) agnhost >/dev/null

install: build
	sh packaging/install.sh install $(BUNDLE) $(DESTDIR)$(PREFIX)/lib/weft $(DESTDIR)$(CNI_BIN_DIR) \
	  $(DESTDIR)$(PREFIX)/bin conf/10-weft.conflist $(DESTDIR)$(CNI_CONF_DIR)

uninstall:
	sh packaging/install.sh remove $(DESTDIR)$(PREFIX)/lib/weft $(DESTDIR)$(CNI_BIN_DIR) $(DESTDIR)$(PREFIX)/bin \
	  conf/10-weft.conflist $(DESTDIR)$(CNI_CONF_DIR)

test: deps venv cnidrive build kube kubectl image node-images lint
	@if [ "$$(id -u)" = 0 ]; then tests/unit/unprivileged.sh $(PY) -q; fi
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) WEFT_BUNDLE=$(CURDIR)/$(BUNDLE) WEFT_IMAGE=$(CURDIR)/$(IMAGES)/weft.tar \
	  WEFT_KUBE_APISERVER=$${WEFT_KUBE_APISERVER:-$(CURDIR)/$(KUBE_APISERVER_LINK)} $(PY) -m pytest -q -m "not long" tests

# The suites of many minutes, left out of make test (CI): the kube policy source with 10,000 pods, and a
# cluster's life (Weft's rollout, kubelet and containerd restarts, the apiserver down, a Node deleted).
test-long: deps venv cnidrive build kube kubectl image node-images
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) WEFT_BUNDLE=$(CURDIR)/$(BUNDLE) WEFT_IMAGE=$(CURDIR)/$(IMAGES)/weft.tar \
	  WEFT_KUBE_APISERVER=$${WEFT_KUBE_APISERVER:-$(CURDIR)/$(KUBE_APISERVER_LINK)} $(PY) -m pytest -q -m long tests

# Pure logic only: needs neither root nor the namespace lab (as root, it runs them as nobody to prove it).
unit: venv
	@if [ "$$(id -u)" = 0 ]; then tests/unit/unprivileged.sh $(PY) -q; else $(PY) -m pytest -q tests/unit; fi

# A clean clone of this checkout runs .ci/run on a pristine Debian 12 root (not part of `make test`).
# The checker is the workspace's fresh-root.sh, beside the checkout in ../shared (FRESH_ROOT names it
# from elsewhere, a worktree say); nothing else here uses ../shared. FRESH_NO_SHARED=1, the default,
# puts the clone there with nothing beside it, as a user's clone of the repository is; 0 copies the
# checker's ../shared beside it.
FRESH_ROOT ?= ../shared/tools/fresh-root.sh
FRESH_NO_SHARED ?= 1
fresh-check:
	@test -f $(FRESH_ROOT) || { echo "$(FRESH_ROOT) not found: set FRESH_ROOT" >&2; exit 1; }
	FRESH_TEST_TIMEOUT=$${FRESH_TEST_TIMEOUT:-5400} FRESH_NO_SHARED=$(FRESH_NO_SHARED) \
	  bash $(FRESH_ROOT) $(CURDIR)

lint: venv
	$(VENV)/bin/ruff check weftlib cni_plugin ipam weftd tests bench packaging/*.py tools/clusterdns
	$(VENV)/bin/mypy weftlib cni_plugin ipam weftd tools/clusterdns/server.py
	$(VENV)/bin/lint-imports

# README.md's table of weftd's flags and variables, from their declarations (weftd/options.py).
docs: venv
	$(PY) -m weftd.options --readme README.md

# Upstream's e2e tests (the NetworkPolicy suite and sig-network's Conformance tests; E2E_FOCUS, E2E_SKIP
# and E2E_NODES change them) against the cluster `make cluster` runs, booting one when none answers.
# Reports under $(BUILD)/e2e/<timestamp>/. Not part of `make test`.
e2e: deps venv kubectl
	bash tools/kube/build.sh $(BUILD) e2e.test ginkgo >/dev/null
	@$(PY) -m tests.k8s.e2e --check || $(MAKE) cluster
	$(PY) -m tests.k8s.e2e

demo: deps venv cnidrive shim
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) $(PY) -m tests.demo

bench: deps venv cnidrive build kube kubectl image test-images
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) WEFT_BUNDLE=$(CURDIR)/$(BUNDLE) $(PY) -m bench.plugin_bench
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) WEFT_BUNDLE=$(CURDIR)/$(BUNDLE) $(PY) -m bench.weftd_bench
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) $(PY) -m bench.dataplane_bench
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) $(PY) -m bench.policy_bench
	CNIDRIVE=$(CURDIR)/$(CNIDRIVE) WEFT_BUNDLE=$(CURDIR)/$(BUNDLE) $(PY) -m bench.policy_bench scale
	$(PY) -m bench.pod_start_bench

# Pod start latency on a two-node cluster (tests/k8s), Weft against bridge + host-local (a few minutes).
pod-start-bench: deps venv kube kubectl image test-images
	$(PY) -m bench.pod_start_bench

clean:
	rm -rf $(BUILD) $(VENV) *.egg-info
