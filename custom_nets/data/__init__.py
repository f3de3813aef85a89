"""data of the MeDUET package."""
