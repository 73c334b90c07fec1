"""DQN on MinAtar (gymnax), fully jitted, with the optimizer as a parameter (see README.md here)."""
