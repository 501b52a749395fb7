"""jaxem.ssl."""
