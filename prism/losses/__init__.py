from prism.losses.base import Loss, LossOutput  # noqa: F401
