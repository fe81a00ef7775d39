"""The seed notebook's training loop, written out unchanged as the baseline of bench/train_throughput.py.

Its model (`ClassConditionedUnet`: `nn.Embedding(10, 4)` planes concatenated to a `UNet2DModel`), its optimizer (Adam,
lr 1e-3), its `DataLoader(shuffle=True)` over torchvision's MNIST dataset class and its per-step `loss.item()`. The
only change: the images come from the bundled parquet, served exactly as `torchvision.datasets.MNIST.__getitem__`
serves them (uint8 -> PIL -> ToTensor), because torchvision's download needs a network.

    python bench/seed_loop.py --batch_size 512 --steps 3     # prints one JSON line: img_s, peak RSS
"""

import argparse
import json
import resource
import time
from pathlib import Path

import torch
import torchvision
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.data import load_split


class SeedMNIST(Dataset):
    """torchvision.datasets.MNIST's item access: a uint8 tensor becomes a PIL image, then ToTensor()."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.data, self.targets = images[:, 0], labels
        self.transform = torchvision.transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.data[index].numpy(), mode="L")
        return self.transform(image), int(self.targets[index])


class ClassConditionedUnet(nn.Module):  # the seed's model, verbatim
    def __init__(self, num_classes=10, class_emb_size=4):
        super().__init__()
        self.class_emb = nn.Embedding(num_classes, class_emb_size)
        self.model = UNet2DModel(
            sample_size=28,
            in_channels=1 + class_emb_size,
            out_channels=1,
            layers_per_block=2,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )

    def forward(self, x, t, class_labels):
        bs, ch, w, h = x.shape
        class_cond = self.class_emb(class_labels)
        class_cond = class_cond.view(bs, class_cond.shape[1], 1, 1).expand(bs, class_cond.shape[1], w, h)
        net_input = torch.cat((x, class_cond), 1)
        return self.model(net_input, t).sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="Training steps to time (the seed trains 1,170).")
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parent.parent / "data" / "mnist"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Where to train.")
    args = parser.parse_args()

    device = args.device
    train = load_split(args.dataset, "train")
    train_dataloader = DataLoader(SeedMNIST(train.images, train.labels), batch_size=args.batch_size, shuffle=True)
    noise_scheduler = DDIMScheduler()
    net = ClassConditionedUnet().to(device)
    loss_fn = nn.MSELoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []

    started = time.perf_counter()
    for step, (x, y) in enumerate(train_dataloader):
        if step == args.steps:
            break
        x = x.to(device) * 2 - 1
        y = y.to(device)
        noise = torch.randn_like(x)
        timesteps = torch.randint(0, 999, (x.shape[0],)).long().to(device)
        noisy_x = noise_scheduler.add_noise(x, noise, timesteps)
        pred = net(noisy_x, timesteps, y)
        loss = loss_fn(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - started
    print(json.dumps({
        "img_s": round(args.steps * args.batch_size / elapsed, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "final_loss": losses[-1],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
