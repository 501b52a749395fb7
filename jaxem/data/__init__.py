"""jaxem.data."""
