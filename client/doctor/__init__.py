"""``fedsynth-site doctor``: the runner (run), what one check reports (checks), and
the checks by what they look at: this host and its data (site), the site's
place in the federation (federation), the deployment's wiring (deploy).
Nothing here trains, loads weights or sends site data.
"""
