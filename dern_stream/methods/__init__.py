"""Compression methods over shared segment and k-means code."""

from .dern import DernParams, LayerResult, RebuiltExpert, dern_layer
from .importance import router_norm_importance, routing_importance, select_experts
from .kmeans import gate_linf_init, spherical_weighted_kmeans
from .segments import ExpertStack, reassign_segments, transfer_counts, transfer_router

__all__ = [
    "DernParams", "ExpertStack", "LayerResult", "RebuiltExpert", "dern_layer", "gate_linf_init", "reassign_segments",
    "router_norm_importance", "routing_importance", "select_experts", "spherical_weighted_kmeans",
    "transfer_counts", "transfer_router",
]
