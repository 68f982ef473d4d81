"""Security tests: hostile input and escapes."""
