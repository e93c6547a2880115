"""The generator's denoiser: S4D state-space layers (s4.py) in an SSSD-style residual stack (denoiser.py)."""
