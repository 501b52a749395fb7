"""jaxem.models."""
