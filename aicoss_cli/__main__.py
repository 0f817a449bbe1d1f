from aicoss_cli.cli import main

main()
