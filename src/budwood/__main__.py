from budwood.cli import main

main()
