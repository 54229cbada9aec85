"""CMAT tuning: the Checker (critic) in the loop, the value function, and actor-critic updates."""
