"""jaxem.segment."""
