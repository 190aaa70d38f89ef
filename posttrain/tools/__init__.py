"""Command-line tools of the repository: depgraph, PEFT search, team mode."""
