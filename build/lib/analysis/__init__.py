"""Analysis of the reproduction: the paper's published numbers, and our runs beside them.

`analysis.paper` gives the paper's tables (packaged CSVs in `analysis/paper_data/`) and the
Figure 2/3 series derived from them.
"""
