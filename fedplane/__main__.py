"""`python -m fedplane` runs the CLI."""

from fedplane.cli import main

if __name__ == "__main__":
    main()
