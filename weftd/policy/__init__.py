"""Kubernetes NetworkPolicy for weftd: objects (model), sources (files, the API server), peer sets named after
what they mean (peersets), pod chains (chains), the tables' fixed layout (layout), the node's ruleset kept
object by object (ruleset) or built from scratch (compile), and the engine that keeps the kernel's tables
equal to it (engine)."""
