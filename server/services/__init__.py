"""Server logic, one module per resource; HTTP routes stay thin and call these."""
