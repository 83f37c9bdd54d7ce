"""Pure functions for the methods' maths (arrays in, arrays out; no models)."""
