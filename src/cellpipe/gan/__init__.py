"""GAN augmentation: conditional generators that grow scarce classes, and their quality."""
