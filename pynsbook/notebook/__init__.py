"""The notebook layer: what the magics (``pynsbook.magics``) are made of."""
