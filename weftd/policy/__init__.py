"""Kubernetes NetworkPolicy for weftd: objects (model), sources (files), the compiler to one nftables
ruleset per node (compile), and the engine that keeps the kernel's table equal to it (engine)."""
