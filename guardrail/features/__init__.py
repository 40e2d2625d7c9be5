"""Feature ranking and the intervention math on feature space."""
