"""Teaching aids for the notebooks: the graded exercises (`exercises`, one module per notebook, on the
machinery of `grader`), the drawings and plots (`diagrams`, `figures`), BPE training (`bpe_train`), a
Q4_K block by hand (`quant`), and a small port of the forward pass with switchable porting mistakes
(`port`), for the gallery of what wrong looks like (notebooks/05_porting_mistakes.ipynb)."""
