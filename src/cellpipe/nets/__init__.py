"""Network architectures: backbones by name (registry) and the classifier around them."""
