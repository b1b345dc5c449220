"""`python -m fedplane.agent --config FILE` runs an agent."""

from fedplane.agent.daemon import cli

if __name__ == "__main__":
    cli()
