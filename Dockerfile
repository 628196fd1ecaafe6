# The Weft image: the frozen bundle from `make build` (no Python inside), and the nftables and
# iptables tools weftd's NAT rules and the reference plugins expect on a node, and wireguard-go for
# the wireguard backend on kernels without the module (wireguard-tools: `wg show` for operators).
#   make build && docker build -t weft:0.1.0 .
# `make image` builds the same image without docker (tools/images/weft.sh, on Debian's minbase);
# tests/unit/test_dockerfile.py fails when the two differ in base, packages, paths or command.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables wireguard-go wireguard-tools \
 && rm -rf /var/lib/apt/lists/*
COPY .build/dist/weft /opt/weft/bundle
COPY packaging/install.sh /opt/weft/install.sh
ENTRYPOINT ["/opt/weft/bundle/weftd"]
CMD ["run"]
