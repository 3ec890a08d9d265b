"""The Optuna search over compression plans: space, trial evaluation, study, Pareto front."""
