"""`python -m avl.eval` (and `torchrun --nproc_per_node N -m avl.eval ...`): same options as `avl eval`."""

from avl.eval.cli import main

if __name__ == "__main__":
    main()
