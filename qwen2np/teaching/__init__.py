"""Teaching aids for the notebooks: exercises graded against the model's own tensors (`grader`), and a
small port of the forward pass with switchable porting mistakes (`port`), for the gallery of what wrong
looks like (notebooks/05_porting_mistakes.ipynb)."""
