from aicoss_cli.cli.app import main

main()
