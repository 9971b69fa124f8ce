"""The storage contract: paths, schemas, atomic commit, ledger, pseudonymised keys.

Bottom floor: imports nothing of ours but ``conf``.
"""
