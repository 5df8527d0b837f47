"""Exploration regularizers behind the instrument seam: ReLaX (latent dynamics) and token-level methods.

Pure math (no TRL imports): `koopman` (dictionary, EDMD operator), `dsd` (Dynamic Spectral Dispersion),
`loss` (advantage-shaped log-mean-exp and adaptive KL), `dictionary` (ResKoopNet-style fit), `covariance`
(Cov(log pi, A) token selection of Cui et al.). Instruments: `relax` and `token_level` (entropy, clip_cov,
kl_cov, and the always-on `entropy_cov` diagnostic for GRPO).
"""
