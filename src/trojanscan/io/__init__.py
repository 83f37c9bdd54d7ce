"""Reading users' models and data sets."""
