from ssa_megatron.train.cli import main

main()
