"""`python -m cxrdiff` (and `accelerate launch -m cxrdiff`) runs the CLI."""

from cxrdiff.cli import main

if __name__ == "__main__":
    main()
