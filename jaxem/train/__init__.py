"""jaxem.train."""
