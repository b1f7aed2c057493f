"""The real-size model architectures the benchmarks build with random weights (no download).

The public configs of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 (``unet/`` and
``vae/config.json``) and of stabilityai/stable-diffusion-3.5-medium and -large (``transformer/``,
``vae/config.json`` and ``scheduler/scheduler_config.json``; the repositories are gated), reduced
to the keys that differ from diffusers' defaults.
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
#: SD 3.5 medium: MMDiT-X, 24 blocks of width 1536, dual (image-only) attention in blocks 0-12.
SD35M_TRANSFORMER = dict(
    num_layers=24,
    num_attention_heads=24,
    attention_head_dim=64,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
#: SD 3.5 large: 38 blocks of width 2432, no dual attention.
SD35L_TRANSFORMER = dict(
    num_layers=38,
    num_attention_heads=38,
    attention_head_dim=64,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)
#: SD 3's VAE: the SD layout with 16 latent channels, no quant convolutions, its latent shift and scale.
SD3_VAE = dict(SD_VAE, sample_size=1024, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
               shift_factor=0.0609, scaling_factor=1.5305, force_upcast=True)
#: SD 3.5's scheduler: flow matching with a fixed shift of 3.
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
