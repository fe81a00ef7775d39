"""`ClassConditionedUNet`: a diffusers `UNet2DModel` conditioned on a class label through extra input channels.

This module imports only torch and diffusers: it is the model code that travels inside a saved pipeline folder.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models import ModelMixin, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn


class ClassConditionedUNet(ModelMixin, ConfigMixin):
    r"""
    A `UNet2DModel` that predicts noise for an image of a given class.

    A learned embedding of the class label (`class_emb_size` numbers) is broadcast over the image plane and
    concatenated to the noisy image as extra input channels, so the UNet sees `in_channels + class_emb_size`
    channels. The embedding table has `num_classes + 1` rows: row `num_classes` is the "no class" id that
    classifier-free guidance uses for the unconditional prediction.

    Parameters:
        num_classes (`int`, *optional*, defaults to 10):
            Number of real classes; valid labels are `0 .. num_classes - 1`, and `num_classes` means "no class".
        class_emb_size (`int`, *optional*, defaults to 4):
            Length of the learned class embedding, i.e. how many extra input channels carry the class.
        sample_size (`int`, *optional*, defaults to 28):
            Height and width of the (square) images.
        in_channels (`int`, *optional*, defaults to 1):
            Channels of the images (1 for grayscale).
        out_channels (`int`, *optional*, defaults to 1):
            Channels of the prediction.
        block_out_channels (`tuple[int]`, *optional*, defaults to `(32, 64, 64)`):
            Width of each UNet resolution level. Every entry must be divisible by `norm_num_groups`.
        layers_per_block (`int`, *optional*, defaults to 2):
            ResNet layers per UNet block.
        down_block_types (`tuple[str]`, *optional*, defaults to the seed's three blocks):
            diffusers down block types, `("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")` by default; the
            `Attn*` ones add self-attention at that resolution.
        up_block_types (`tuple[str]`, *optional*, defaults to `("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")`):
            diffusers up block types, mirroring `down_block_types`.
        attention_head_dim (`int`, *optional*, defaults to 8):
            Channels per attention head.
        norm_num_groups (`int`, *optional*, defaults to 32):
            Groups of the GroupNorm layers.
        id2label (`dict[int, str]`, *optional*):
            Human-readable name of each class id (for MNIST `{0: "0", ..., 9: "9"}`), saved with the config so that
            pipelines can accept label names.
        time_class_embedding (`bool`, *optional*, defaults to `False`):
            Also add a second learned class embedding to the timestep embedding (diffusers' `num_class_embeds`), so
            that every ResNet block sees the class, not only the input layer. Off in the seed's design; it makes
            short runs follow the requested class much sooner.
        class_dropout_prob (`float`, *optional*, defaults to 0.0):
            Probability with which training replaced the label by the "no class" id. Recorded so that a pipeline can
            warn when classifier-free guidance is asked of a model that never learned the unconditional case.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = 10,
        class_emb_size: int = 4,
        sample_size: int = 28,
        in_channels: int = 1,
        out_channels: int = 1,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 2,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim: int = 8,
        norm_num_groups: int = 32,
        id2label: dict[int, str] | None = None,
        time_class_embedding: bool = False,
        class_dropout_prob: float = 0.0,
    ):
        super().__init__()
        if any(channels % norm_num_groups for channels in block_out_channels):
            raise ValueError(
                f"Every entry of block_out_channels={tuple(block_out_channels)} must be divisible by "
                f"norm_num_groups={norm_num_groups}; change one of them."
            )
        # One extra row: index `num_classes` is the learned "no class" embedding used by classifier-free guidance.
        self.class_embedding = nn.Embedding(num_classes + 1, class_emb_size)
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels + class_emb_size,
            out_channels=out_channels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            num_class_embeds=num_classes + 1 if time_class_embedding else None,
        )

    @property
    def null_class_id(self) -> int:
        """The "no class" label id (`num_classes`) used for the unconditional prediction."""
        return self.config.num_classes

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        class_labels: torch.Tensor,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        r"""
        Predict the noise in `sample`.

        Args:
            sample (`torch.Tensor` of shape `(batch, in_channels, sample_size, sample_size)`):
                The noisy images.
            timestep (`torch.Tensor` or `int`):
                Diffusion timestep, one per image or one for the whole batch.
            class_labels (`torch.LongTensor` of shape `(batch,)`):
                Class id of each image, `num_classes` for "no class".
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`~models.unets.unet_2d.UNet2DOutput`] instead of a plain tuple.

        Returns:
            [`~models.unets.unet_2d.UNet2DOutput`] or `tuple`: the predicted noise, shaped like `sample`.
        """
        batch_size, _, height, width = sample.shape
        # (batch, class_emb_size) -> (batch, class_emb_size, height, width): the class is a constant image plane.
        class_planes = self.class_embedding(class_labels).to(sample.dtype)
        class_planes = class_planes[:, :, None, None].expand(batch_size, -1, height, width)
        time_class_labels = class_labels if self.config.time_class_embedding else None
        model_output = self.unet(torch.cat([sample, class_planes], dim=1), timestep, time_class_labels).sample
        if not return_dict:
            return (model_output,)
        return UNet2DOutput(sample=model_output)
