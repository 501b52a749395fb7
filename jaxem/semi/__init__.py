"""jaxem.semi."""
