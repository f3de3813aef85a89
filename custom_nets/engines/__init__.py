"""engines of the MeDUET package."""
