"""Per-version OpenFaaS functions: naming, build contexts, the REST client, the budget and the local provider.

Kept import-light on purpose: function processes import `customscripts.faas.runner` on every cold start.
"""
