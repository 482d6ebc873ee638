"""Enterprises, price cards, invoices and settlements (issues to come)."""
