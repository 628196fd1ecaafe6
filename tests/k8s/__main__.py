"""python -m tests.k8s up [--nodes N] | down | status   (make cluster, make cluster-down)"""

from __future__ import annotations

import argparse
from pathlib import Path

from tests.k8s.cluster import Cluster
from tests.k8s.layout import CLUSTER_DIR, IMAGES_DIR


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.k8s", description=__doc__)
    parser.add_argument("--dir", type=Path, default=CLUSTER_DIR, help="the cluster's state (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="boot a cluster and install Weft from conf/kube-weft.yml")
    up.add_argument("--nodes", type=int, default=3, help="nodes, the control-plane node included (default: 3)")
    up.add_argument("--images", type=Path, default=IMAGES_DIR, help="OCI archives imported into every node")
    sub.add_parser("down", help="stop and remove everything the cluster's `up` made")
    sub.add_parser("status", help="the recorded processes and the nodes")
    args = parser.parse_args()
    cluster = Cluster(args.dir, getattr(args, "images", IMAGES_DIR))
    if args.command == "up":
        cluster.up(args.nodes)
    elif args.command == "down":
        cluster.down()
    else:
        cluster.status()


if __name__ == "__main__":
    main()
