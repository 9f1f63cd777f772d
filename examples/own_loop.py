"""G&P PQ in a plain PyTorch training loop: DDP under torchrun, compression through the API.

    torchrun --nproc_per_node=2 examples/own_loop.py --config configs/demo_digits.yaml --out own.gppq

Any model and any data loader will do; this one builds the config's torchvision model and
reads batches with the project's loader, so that it reproduces `gppq train` with the same
config bit for bit (tests/test_api.py checks that). On GPUs: the "nccl" backend, the model
and every batch on cuda:LOCAL_RANK.
"""

import argparse

import torch
import torch.distributed as dist
import torchvision
from torch import nn

import gppq_dist
from gppq_dist.config import load_config
from gppq_dist.data.loaders import build_loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a gppq YAML config (model, data, quantization, train)")
    parser.add_argument("--out", default="own_loop.gppq", help="where rank 0 writes the compressed model")
    args = parser.parse_args()
    cfg = load_config(args.config)
    hp = cfg.train
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(cfg.seed)
    model = torchvision.models.get_model(cfg.model.arch, num_classes=cfg.model.num_classes)
    handle = gppq_dist.prepare(model, cfg)  # k-means over the ranks; the codewords become parameters
    ddp = nn.parallel.DistributedDataParallel(model)  # wrap and build the optimizer after prepare
    optimizer = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    handle.attach(optimizer)  # G&P's residual recursion follows every step

    loader = build_loader(cfg.data, "train", rank=rank, world_size=world, seed=cfg.seed,
                          batch_size=hp.batch_size // world)
    for epoch in range(1, hp.epochs + 1):
        handle.begin_epoch(epoch)
        loader.set_epoch(epoch - 1)
        ddp.train()
        for images, labels in loader:
            handle.before_forward()
            loss = nn.functional.cross_entropy(ddp(images), labels)
            loss.backward()
            handle.after_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"epoch {epoch}: last loss {loss.item():.4f}, Gamma {handle.gamma():.3e}")
    model, artifact = handle.finalize(args.out)  # every rank; rank 0 writes
    if rank == 0:
        print(f"{args.out}: {artifact.accounted_bytes / 2**20:.3f} MB accounted")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
