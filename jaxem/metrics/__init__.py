"""jaxem.metrics."""
