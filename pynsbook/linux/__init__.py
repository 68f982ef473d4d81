"""Thin, typed wrappers over the Linux system calls containers are made of."""
