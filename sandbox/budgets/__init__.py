"""Budgets: one memory/pids ceiling shared by many sandboxes, and admission into it (issue 14)."""
