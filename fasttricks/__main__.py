from fasttricks.cli import main

main()
