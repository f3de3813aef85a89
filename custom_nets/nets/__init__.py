"""nets of the MeDUET package."""
