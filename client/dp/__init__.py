"""Differential privacy at a site: the DP-SGD recipe's config, steps and book-keeping,
the secret noise and Poisson sampling, the per-patient training examples, the
privacy ledger with its key, records, anchors and recovery, and the NON-private
baseline of the study. Everything that decides or records how much privacy a
round spends lives here; nothing here reads the network.
"""
