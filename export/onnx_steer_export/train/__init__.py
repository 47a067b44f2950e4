"""Training steering artifacts on the bundle: static vectors, L2S, W2S, SVF, AutoSteer, and the HF reference hooks."""
