"""One module per `jaxem` command; see jaxem/cli.py."""
