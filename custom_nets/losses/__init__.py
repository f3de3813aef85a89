"""losses of the MeDUET package."""
