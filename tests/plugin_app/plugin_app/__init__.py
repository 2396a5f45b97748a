"""plugin-app: a Flower / PyTorch quickstart-style app."""
