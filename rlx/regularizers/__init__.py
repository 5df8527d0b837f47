"""The math of the exploration regularizers, pure functions over tensors (no TRL, trainer or instrument import).

`koopman` (dictionary, EDMD operator), `dsd` (Dynamic Spectral Dispersion), `loss` (advantage-shaped log-mean-exp
and adaptive KL), `dictionary` (ResKoopNet-style fit): ReLaX; `covariance` (Cov(log pi, A) token selection of
Cui et al.): Clip-Cov, KL-Cov. The instruments that use them are in `rlx/instruments/` (`relax`, `covariance`,
`entropy`).
"""
