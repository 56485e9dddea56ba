"""The digits demo: a small PyTorch CNN federated over scikit-learn's digits data."""
