"""The dashboard page and its assets: package data, served by neuronctl/api/dashboard.py."""
