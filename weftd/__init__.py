"""weftd: the node daemon that connects every node's pod network."""
