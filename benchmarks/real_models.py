"""The real-size model architectures the benchmarks build with random weights (no download).

The public configs of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 (``unet/`` and
``vae/config.json``), reduced to the keys that differ from diffusers' defaults.
"""

from __future__ import annotations

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
)
