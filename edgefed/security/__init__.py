"""Security: device identity and broker credentials (certs.py), robust aggregation (robust.py)."""
