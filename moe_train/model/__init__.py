from moe_train.model.decoder import MoETransformer, build_model
from moe_train.model.experts import GroupedExperts
from moe_train.model.moe_layer import LocalDispatcher, MoELayer

__all__ = ["MoETransformer", "build_model", "GroupedExperts", "LocalDispatcher", "MoELayer"]
