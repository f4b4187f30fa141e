"""The fitting options on the cached inputs: the rows a layer is fitted and judged on, and the refits of the
down projections, the router rows and (by gradient steps) gate, up and down."""
