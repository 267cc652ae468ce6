"""The paper's published numbers as tidy CSV files (data only; read them via `analysis.paper`)."""
