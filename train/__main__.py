"""`python -m liverstage.train ARGS` == `liverstage train ARGS` (for `torchrun -m liverstage.train`)."""

import sys

from liverstage.runtime.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
