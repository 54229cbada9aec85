"""Environments the Assistant acts in (AgentBench domains)."""
