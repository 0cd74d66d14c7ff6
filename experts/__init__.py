"""Routed experts: grouped SwiGLU over (layer, expert) slots."""
