"""weft-ipam: host-local compatible IP address management."""
