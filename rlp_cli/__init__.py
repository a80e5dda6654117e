"""rlp: train language models with RLP (Reinforcement as a Pretraining Objective) and run its ablations."""

__version__ = "0.1.0"
