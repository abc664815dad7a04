"""Recipe search (``cellpipe tune``): a small, principled set of training recipes tried on
the training data's val split with Optuna, above the stages whose core functions it calls.

``space`` defines the recipes, ``search`` runs the study, ``report`` writes its table,
plot and choice, ``params_file`` writes the choice back into params.yaml.
"""
