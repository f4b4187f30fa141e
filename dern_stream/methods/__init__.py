"""Compression methods over shared segment and k-means code."""

from ..experts.importance import router_norm_importance, routing_importance, select_experts
from ..experts.kmeans import gate_linf_init, spherical_weighted_kmeans
from ..experts.recombine import DernParams, LayerResult, RebuiltExpert, dern_layer
from ..experts.segments import ExpertStack, reassign_segments, transfer_counts, transfer_router

__all__ = [
    "DernParams", "ExpertStack", "LayerResult", "RebuiltExpert", "dern_layer", "gate_linf_init", "reassign_segments",
    "router_norm_importance", "routing_importance", "select_experts", "spherical_weighted_kmeans",
    "transfer_counts", "transfer_router",
]
