"""gradwire: compression of the neural gradients that cross model-parallel boundaries.

Layers, top to bottom (see docs/architecture.md):
``integrations`` -> ``comm`` -> ``policy`` -> ``codec`` -> ``ops`` -> ``numerics``; ``sparse`` beside them.
"""

__version__ = "0.1.0"
