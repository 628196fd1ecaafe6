from weftd.main import main

main()
