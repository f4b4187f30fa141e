"""The rewrite: a plan made from headers, routers and the dump, then executed layer by layer (one process,
worker processes or Ray tasks) into a staged output, with its audit record."""
