"""CURVE key files and allow-lists (keys) and the ZAP authenticator thread (guard)."""
