from prism.backbones.base import Backbone, BackboneOutput  # noqa: F401
