"""Training methods: what the train stage fits beyond plain supervised learning.

Pseudo-label rounds, the semi-supervised GAN, FixMatch and the synthetic-data gate.
They sit above both ``engine`` (the one training loop they plug into) and ``gan``
(whose generator the SGAN borrows); neither of those imports anything from here.
"""
