"""The FPN detectors: backbones, necks, heads, checkpoints and the predictor."""
from ._imports import install as _skip_dynamo_import

_skip_dynamo_import()  # an import hook only: nothing is imported here (fpn_model._imports)
