"""A tiny Flower app for the deployment tests: each site adds its own constant to a shared array."""
