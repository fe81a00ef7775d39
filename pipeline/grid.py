"""Sample grids: one row per class, its label name written at the left."""

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

PADDING = 2


def labelled_grid(images: torch.Tensor, row_labels: list[str], columns: int, scale: int = 1) -> Image.Image:
    """A grid of `images` (N x C x H x W in [0, 1], row-major) with `row_labels[r]` written left of row r.

    `scale` enlarges the grid by pixel repetition (28-pixel digits are tiny on a screen); the labels stay sharp.
    """
    mode = "L" if images.shape[1] == 1 else "RGB"  # grayscale digits stay grayscale; colour images keep colour
    grid = make_grid(images.float().cpu(), nrow=columns, padding=PADDING, pad_value=1.0)
    grid = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).convert(mode)
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default(size=max(10, 10 * scale))
    margin = max(int(font.getlength(label)) for label in row_labels) + 8
    canvas = Image.new(mode, (grid.width + margin, grid.height), color="white")
    canvas.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = grid.height / len(row_labels)
    for row, label in enumerate(row_labels):
        draw.text((4, (row + 0.5) * row_height), label, fill="black", font=font, anchor="lm")
    return canvas
