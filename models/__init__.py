"""nn.Modules and their configs: ViT3D, MiM, fusion + heads and the task registry (each task's heads,
losses, scores), the input contract, HF-format save/load and export."""
