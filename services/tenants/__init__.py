"""Businesses (tenants), API keys and the auth dependencies."""
