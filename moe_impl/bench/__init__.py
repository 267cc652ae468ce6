"""`python -m moe_impl bench`: the layer against a FLOP-matched dense FFN, one child process per
configuration (worker), the expert-parallel step (distributed), and the tables (plot)."""
