from kdistill.cli import main

main()
