from cni_plugin.plugin import main

main()
