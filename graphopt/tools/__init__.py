"""Tools on top of the API: the model zoo and training workflows (RepBN self-distillation)."""
