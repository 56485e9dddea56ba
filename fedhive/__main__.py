from fedhive.cli import main

main()
