"""jaxem.infer."""
