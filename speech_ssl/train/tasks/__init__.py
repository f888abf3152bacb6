"""Tasks for the shared training loop: what is trained, on what, and how it is scored."""
