"""A real Kubernetes 1.20 cluster on one machine, offline and without docker, made like kind's: each node
a set of Linux namespaces with its own containerd, kubelet and kube-proxy, the control plane on the
first node, and Weft installed by `kubectl apply -f conf/kube-weft.yml`. `make cluster` and
`make cluster-down` run `python -m tests.k8s up|down`; tests/test_k8s_smoke.py boots one of its own."""
