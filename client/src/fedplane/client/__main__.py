"""`python -m fedplane.client` runs the `fedplane` CLI."""

from fedplane.client.cli import main

if __name__ == "__main__":
    main()
