from ckptavg.cli import main

main()
