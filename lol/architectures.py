"""The paper's base models as architecture configs (data), built here with random weights to time the standard
evaluation at the paper's scale (`lol.speed`): the cost of a forward pass does not depend on the weights.

Each ``FULL`` entry copies the public ``config.json`` of a released checkpoint, keeping the keys that shape the
network (the rest are defaults of the library class):

* ``unet``, ``vae``, ``text_encoder``, ``scheduler``: ``runwayml/stable-diffusion-v1-5``, files ``unet/config.json``
  (`diffusers.UNet2DConditionModel`), ``vae/config.json`` (`diffusers.AutoencoderKL`), ``text_encoder/config.json``
  (`transformers.CLIPTextModel`: the text tower of ``openai/clip-vit-large-patch14``) and
  ``scheduler/scheduler_config.json`` (`diffusers.PNDMScheduler`, the pipeline's default). SD-1.4, the paper's base,
  has the same architecture.
* ``clip``: ``openai/clip-vit-base-patch16`` ``config.json`` (`transformers.CLIPModel`), the paper's CLIP-score model.
* ``lm``: ``Qwen/Qwen2-1.5B`` ``config.json`` (`transformers.Qwen2ForCausalLM`): 28 layers × {q, v}, the paper's
  Qwen2-ARC layer set.

``QUICK`` holds tiny models of the same classes and structure for tests (seconds on a CPU). `build` makes one
component; the LoRA shapes they imply are `lol.synth`'s specs (a test checks the two agree).
"""
from __future__ import annotations

import torch

__all__ = ["FULL", "QUICK", "configs", "build", "linear_shapes"]

_CLIP_TEXT_L14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

FULL: dict[str, dict] = {
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280],
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
                 downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
                 center_input_sample=False),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215),
    "text_encoder": _CLIP_TEXT_L14,
    "scheduler": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
    "clip": dict(projection_dim=512, logit_scale_init_value=2.6592,
                 text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                  num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu"),
                 vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                    num_attention_heads=12, image_size=224, patch_size=16, hidden_act="quick_gelu")),
    "lm": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
               num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=131072,
               rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
               max_window_layers=28),
}

QUICK: dict[str, dict] = {
    "unet": dict(FULL["unet"], sample_size=8, layers_per_block=1, block_out_channels=[16, 32, 32, 32],
                 cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8),
    "vae": dict(FULL["vae"], sample_size=64, layers_per_block=1, block_out_channels=[8, 8, 16, 16],
                norm_num_groups=4),
    "text_encoder": dict(_CLIP_TEXT_L14, vocab_size=1000, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, projection_dim=24, bos_token_id=998, eos_token_id=999, pad_token_id=1),
    "scheduler": FULL["scheduler"],
    "clip": dict(projection_dim=16,
                 text_config=dict(FULL["clip"]["text_config"], vocab_size=1000, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=2, bos_token_id=998, eos_token_id=999,
                                  pad_token_id=1),
                 vision_config=dict(FULL["clip"]["vision_config"], hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)),
    "lm": dict(FULL["lm"], vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_window_layers=2),
}


def configs(quick: bool = False) -> dict[str, dict]:
    return QUICK if quick else FULL


def build(component: str, quick: bool = False, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A random-weight ``component`` (a key of `FULL`) in eval mode, on ``device`` in ``dtype`` (the scheduler: its
    object). ``device="meta"`` builds the structure only (no memory, no time), e.g. to read module shapes."""
    cfg = configs(quick)[component]
    if component == "scheduler":
        from diffusers import PNDMScheduler
        return PNDMScheduler(**cfg)
    with torch.device(device):
        if component == "unet":
            from diffusers import UNet2DConditionModel
            model = UNet2DConditionModel(**cfg)
        elif component == "vae":
            from diffusers import AutoencoderKL
            model = AutoencoderKL(**cfg)
        elif component == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel
            model = CLIPTextModel(CLIPTextConfig(**cfg))
        elif component == "clip":
            from transformers import CLIPConfig, CLIPModel
            model = CLIPModel(CLIPConfig(**cfg))
        elif component == "lm":
            from transformers import Qwen2Config, Qwen2ForCausalLM
            model = Qwen2ForCausalLM(Qwen2Config(**cfg))
        else:
            raise ValueError(f"unknown component {component!r}; choose from {', '.join(FULL)}")
    if dtype != torch.float32 and str(device) != "meta":   # built in float32; cast only when asked otherwise
        model = model.to(dtype=dtype)
    return model.eval()


def linear_shapes(model: torch.nn.Module, suffixes, prefix: str = "") -> dict[str, tuple[int, int]]:
    """``{prefix + module name: (out, in)}`` of the ``nn.Linear`` modules whose names end with one of ``suffixes``
    (e.g. ``("to_q", "to_v")``), in module order: the LoRA weight space those targets span on ``model``."""
    suffixes = tuple(f".{s}" if not s.startswith(".") else s for s in suffixes)
    return {prefix + n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and f".{n}".endswith(suffixes)}
