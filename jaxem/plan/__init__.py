"""jaxem.plan."""
