"""Weft's CNI plugin: attaches pods to the node bridge through a veth pair."""
