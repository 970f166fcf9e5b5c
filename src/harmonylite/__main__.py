from harmonylite.cli.main import main

main()
