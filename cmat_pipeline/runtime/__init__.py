"""Agent runtime: policies that write assistant turns, and the batched episode loop."""
