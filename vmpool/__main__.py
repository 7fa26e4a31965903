from vmpool.cli import main

main()
