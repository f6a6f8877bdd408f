"""Where a student's distillation targets come from: an offline cache, other teachers."""
