from rolecast.cli import main

main()
