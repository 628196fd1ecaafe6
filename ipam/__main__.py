from ipam.plugin import main

main()
