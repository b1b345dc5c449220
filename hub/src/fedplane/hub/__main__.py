"""`python -m fedplane.hub [--config FILE]` runs the hub."""

from fedplane.hub.server import cli

if __name__ == "__main__":
    cli()
