"""Representation comparison (`crate compare`): do CRATE and GPT learn the same thing?

    cka.py          linear CKA, unbiased (Nguyen et al. 2021) and biased (Kornblith et al. 2019), over minibatches
    similarity.py   CKA of every pair of layers of two models on the same tokens (residual stream and neurons)
    stitch.py       an affine stitch from A's block i into B's block i+1, both frozen, and its loss
    penalties.py    which stitches a comparison makes (self, both directions, random-init control)
    trajectory.py   CKA of each layer along training against its final state
    inputs.py       the models, data and grid checked before any work; the identity of a comparison
    run.py          the command's work: check, reuse or compute, write; tables.py, plots.py, outputs.py the folder
"""
