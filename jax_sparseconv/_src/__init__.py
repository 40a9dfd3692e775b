"""Private implementation modules of jax_sparseconv. Import the public API from ``jax_sparseconv``."""
