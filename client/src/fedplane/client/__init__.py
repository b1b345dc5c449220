"""The client side: the Python SDK (`sdk`), job spec files (`spec`), the `fedplane` CLI
(`cli`) and its tables (`display`). Nothing here imports the hub or the agent."""
