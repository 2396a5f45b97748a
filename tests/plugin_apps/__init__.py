"""Flower apps as their users write them, each switched to re-basin by the lines marked
``# re-basin``: a FedAvg subclass with hooks of its own (the shape of Flower's advanced
PyTorch example) and a differential-privacy server."""
