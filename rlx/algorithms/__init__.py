"""Pure math over tensors: no TRL imports here. One function per estimator or loss, equation in the docstring."""
