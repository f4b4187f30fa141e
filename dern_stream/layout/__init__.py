"""A model's MoE layers in a checkpoint: their tensors checked against the family and the config, the output
tensors planned, fused layouts sliced per expert, parameters counted."""
