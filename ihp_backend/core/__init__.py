"""The HTTP-free core: clicks and localization maps, the network, checkpoint and binding,
inference and refinement, the label rules and the Label Studio result format. Nothing here knows
HTTP, storage or jobs; serving (``ihp_backend``), training and evaluation (``model_training``)
all run the network through these modules (see docs/architecture.md)."""
