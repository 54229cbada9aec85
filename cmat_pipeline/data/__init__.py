"""Data pipeline: collection, validation, filtering, augmentation, distillation and mixing."""
