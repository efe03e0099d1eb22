"""nn.Modules and their configs: ViT3D, MiM, fusion + heads, HF-format save/load."""
