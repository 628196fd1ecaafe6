"""One frozen program for every Python Weft command, chosen by the name it is run as: `weft-py` (the
plugin, which the compiled `weft` shim runs when weftd is not there), `weft-ipam` and `weftd`."""

import os
import sys

name = os.path.basename(sys.argv[0])
if name == "weft-ipam":
    from ipam.plugin import main
elif name == "weftd":
    from weftd.main import main
else:
    from cni_plugin.main import main
main()
