"""Training score networks and classifiers: ``train.train_and_evaluate(config, workdir)``, the sharded train
state and step (``train_state``), the losses (``losses``) and periodic evaluation (``evaluate``).

Nothing is imported here, so importing one module does not pull in the others.
"""
