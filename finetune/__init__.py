"""dsft training engine, methods and recipes."""
